//! Timeouts: `-t` (TTL, counted from when proxying starts) cuts a proxying
//! connection and the next one is served; `--queue-timeout` closes a client
//! that waited too long in the queue without touching the active one.
mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn ttl_cuts_a_connection_and_the_next_one_is_served() {
    let up = Upstream::echo();
    // Bare number: milliseconds, as in the original tool.
    let proxy = Proxy::start(&[
        "-u",
        &up.arg(),
        "-n",
        "1",
        "-t",
        "600",
        "--log-level",
        "debug",
    ]);

    let t_first = Instant::now();
    let mut first = proxy.connect();
    roundtrip(&mut first, b"first\n");

    let mut second = proxy.connect();
    second.write_all(b"second\n").expect("write while queued");
    proxy.expect_log(conn_event("accepted", 2), "accepted conn=2");

    // The first one idles and gets cut by the TTL.
    let ended = expect_closed(&mut first, Duration::from_secs(5));
    let first_life = t_first.elapsed();
    ended.unwrap_or_else(|e| panic!("first connection not cut by -t 600: {e}"));
    assert!(
        first_life >= Duration::from_millis(500),
        "cut after only {first_life:?}"
    );
    proxy.expect_log(conn_event("timeout", 1), "timeout conn=1");
    proxy.expect_log(closed_with(1, "timeout"), "closed conn=1 outcome=timeout");
    assert!(
        wait_until(WAIT, || up.ended() >= 1),
        "the TTL cut did not close the upstream side"
    );

    // The second, queued for about the TTL, now gets its own full TTL.
    let got = read_n(&mut second, 7).expect("second client is served after the cut");
    assert_eq!(got, b"second\n");
    let t_served = Instant::now();
    roundtrip(&mut second, b"still here\n");
    let ended = expect_closed(&mut second, Duration::from_secs(5));
    let second_life = t_served.elapsed();
    ended.unwrap_or_else(|e| panic!("second connection not cut by -t 600: {e}"));
    assert!(
        second_life >= Duration::from_millis(400),
        "second cut {second_life:?} after it was served: TTL counted from accept, not from proxying?"
    );
    proxy.expect_log(closed_with(2, "timeout"), "closed conn=2 outcome=timeout");
    assert_eq!(up.accepted(), 2);
}

#[test]
fn queue_timeout_closes_a_waiting_client_only() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &up.arg(),
        "-n",
        "1",
        "--queue-timeout",
        "300ms",
        "--log-level",
        "debug",
    ]);

    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holder\n");

    let t_waiter = Instant::now();
    let mut waiter = proxy.connect();
    waiter.write_all(b"waiting\n").expect("write while queued");
    let ended = expect_closed(&mut waiter, Duration::from_secs(5));
    let waited = t_waiter.elapsed();
    let (_, data) =
        ended.unwrap_or_else(|e| panic!("queued client not closed by --queue-timeout: {e}"));
    assert!(data.is_empty(), "queued client got data: {data:?}");
    assert!(
        waited >= Duration::from_millis(250),
        "closed after only {waited:?}"
    );
    proxy.expect_log(conn_event("queue_timeout", 2), "queue_timeout conn=2");
    proxy.expect_log(
        closed_with(2, "queue_timeout"),
        "closed conn=2 outcome=queue_timeout",
    );

    // The holder has been proxying for longer than the queue timeout: untouched.
    roundtrip(&mut holder, b"holder still works\n");
    finish(holder);
    proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");

    let mut next = proxy.connect();
    roundtrip(&mut next, b"next\n");
    finish(next);
    proxy.expect_log(closed_with(3, "ok"), "closed conn=3 outcome=ok");
    assert_eq!(
        up.accepted(),
        2,
        "the timed-out client must never reach the upstream"
    );
}
