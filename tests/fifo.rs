//! FIFO queue: queued clients are activated in accept order, and a client
//! that leaves the queue is skipped without ever reaching the upstream.
mod common;

use common::*;
use std::io::Write;
use std::thread;

#[test]
fn eight_queued_clients_are_served_in_accept_order() {
    let up = Upstream::recording();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1", "--log-level", "debug"]);

    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holder\n");
    proxy.expect_log(conn_event("activated", 1), "activated conn=1");

    // Connect the queued clients one at a time, each one only after the
    // proxy logged the previous accept, so accept order is known: conn=2..9.
    // Each sends its tag at once, while queued.
    let mut queued = Vec::new();
    for i in 1..=8u64 {
        let mut s = proxy.connect();
        s.write_all(format!("c{i}\n").as_bytes())
            .expect("write tag while queued");
        proxy.expect_log(
            conn_event("accepted", i + 1),
            &format!("accepted conn={}", i + 1),
        );
        queued.push((i, s));
    }
    assert_eq!(
        up.accepted(),
        1,
        "a queued client reached the upstream while the holder held"
    );

    let threads: Vec<_> = queued
        .into_iter()
        .map(|(i, mut s)| {
            thread::spawn(move || {
                let tag = format!("c{i}\n");
                let got =
                    read_n(&mut s, tag.len()).unwrap_or_else(|e| panic!("c{i}: read echo: {e}"));
                assert_eq!(got, tag.as_bytes(), "c{i}: echo");
                finish(s);
            })
        })
        .collect();
    finish(holder);
    for t in threads {
        t.join().expect("queued client thread");
    }

    let expected: Vec<String> = std::iter::once("holder".to_string())
        .chain((1..=8).map(|i| format!("c{i}")))
        .collect();
    assert_eq!(
        up.records(),
        expected,
        "order the upstream saw the clients in"
    );

    assert!(
        proxy.wait_for_count(outcome("ok"), 9, WAIT),
        "not all 9 closed ok"
    );
    let activated: Vec<u64> = proxy
        .matching(event("activated"))
        .iter()
        .map(|l| num_field(l, "conn"))
        .collect();
    assert_eq!(
        activated,
        (1..=9).collect::<Vec<u64>>(),
        "activation order in the log"
    );
}

#[test]
fn client_that_leaves_the_queue_is_skipped() {
    let up = Upstream::recording();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1", "--log-level", "debug"]);

    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holder\n");

    let leaver = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "accepted conn=2");
    drop(leaver);
    proxy.expect_log(
        conn_event("abandoned", 2),
        "abandoned conn=2 while the holder holds",
    );
    proxy.expect_log(
        closed_with(2, "abandoned"),
        "closed conn=2 outcome=abandoned",
    );

    let mut next = proxy.connect();
    next.write_all(b"next\n").expect("write while queued");
    proxy.expect_log(conn_event("accepted", 3), "accepted conn=3");
    finish(holder);

    let got = read_n(&mut next, 5).expect("next client is served");
    assert_eq!(got, b"next\n");
    finish(next);

    assert_eq!(up.records(), vec!["holder", "next"], "upstream saw");
    assert_eq!(
        up.accepted(),
        2,
        "the abandoned client must never reach the upstream"
    );
    assert_eq!(
        proxy.count_logs(conn_event("activated", 2)),
        0,
        "abandoned conn=2 was activated"
    );
    proxy.expect_log(closed_with(3, "ok"), "closed conn=3 outcome=ok");
}
