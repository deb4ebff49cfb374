//! `--max-queue N`: with N clients waiting, one more is accepted and closed
//! at once (rejected, reason=queue_full); the waiting ones are unaffected and
//! the queue takes clients again once it has room.
mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn one_more_than_max_queue_is_rejected_at_once() {
    let up = Upstream::recording();
    let proxy = Proxy::start(&[
        "-u",
        &up.arg(),
        "-n",
        "1",
        "--max-queue",
        "2",
        "--log-level",
        "debug",
    ]);

    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holder\n");
    let mut b = proxy.connect();
    b.write_all(b"b\n").expect("write");
    proxy.expect_log(conn_event("accepted", 2), "accepted conn=2");
    let mut c = proxy.connect();
    c.write_all(b"c\n").expect("write");
    proxy.expect_log(conn_event("accepted", 3), "accepted conn=3");

    let t = Instant::now();
    let mut d = proxy.connect();
    let ended = expect_closed(&mut d, Duration::from_secs(3));
    let took = t.elapsed();
    ended.unwrap_or_else(|e| panic!("fourth client (queue full) not closed: {e}"));
    assert!(took < Duration::from_secs(2), "rejection took {took:?}");
    let rejected = proxy.expect_log(conn_event("rejected", 4), "rejected conn=4");
    assert_eq!(
        field(&rejected, "reason").as_deref(),
        Some("queue_full"),
        "{rejected}"
    );
    assert!(field(&rejected, "client").is_some(), "{rejected}");
    proxy.expect_log(closed_with(4, "rejected"), "closed conn=4 outcome=rejected");

    finish(holder);
    assert_eq!(read_n(&mut b, 2).expect("b served"), b"b\n");
    finish(b);
    assert_eq!(read_n(&mut c, 2).expect("c served"), b"c\n");
    finish(c);

    // Room again: the next client is queued/served normally.
    let mut e = proxy.connect();
    roundtrip(&mut e, b"e\n");
    finish(e);
    proxy.expect_log(closed_with(5, "ok"), "closed conn=5 outcome=ok");
    assert_eq!(up.records(), vec!["holder", "b", "c", "e"], "upstream saw");
    assert_eq!(proxy.count_logs(event("rejected")), 1, "rejections");
}
