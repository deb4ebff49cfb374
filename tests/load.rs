//! Load: 300 clients behind `-n 2` (30 client threads × 10 clients each) all
//! get their own bytes back, and the upstream never sees more than 2.
mod common;

use common::*;
use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn three_hundred_clients_behind_two_permits_all_echoed() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "2"]);
    let start = Instant::now();

    let threads: Vec<_> = (0..30)
        .map(|t| {
            let addr = proxy.addr();
            thread::spawn(move || {
                for k in 0..10 {
                    let id = t * 10 + k;
                    let msg = format!("client {id:03} ").repeat(1 + id % 200).into_bytes();
                    let mut s = connect(addr);
                    s.write_all(&msg)
                        .unwrap_or_else(|e| panic!("client {id}: write: {e}"));
                    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
                    let got =
                        read_to_eof(&mut s).unwrap_or_else(|e| panic!("client {id}: read: {e}"));
                    assert!(
                        got == msg,
                        "client {id}: got {} bytes, sent {}",
                        got.len(),
                        msg.len()
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let took = start.elapsed();

    assert!(
        proxy.wait_for_count(outcome("ok"), 300, WAIT),
        "closed outcome=ok: {} of 300",
        proxy.count_logs(outcome("ok"))
    );
    assert_eq!(proxy.count_logs(event("closed")), 300, "closed lines");
    assert_eq!(up.accepted(), 300, "upstream connections");
    assert!(
        up.max_concurrent() <= 2,
        "upstream saw {} at once with -n 2",
        up.max_concurrent()
    );
    let mut ids: Vec<u64> = proxy
        .matching(event("closed"))
        .iter()
        .map(|l| num_field(l, "conn"))
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=300).collect::<Vec<u64>>(),
        "conn ids 1..=300, each closed once"
    );
    assert!(took < Duration::from_secs(30), "300 clients took {took:?}");
    eprintln!(
        "300 clients behind -n 2 in {took:?}, upstream max concurrency {}",
        up.max_concurrent()
    );
}

#[test]
fn a_thousand_queued_connections_cost_little_memory() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1", "--log-level", "debug"]);
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holder\n");
    let rss_before = proxy.rss_kib();

    // In batches of 100, each one accepted before the next: a burst larger
    // than the listen backlog (128) would only measure SYN retransmits.
    let mut queued = Vec::new();
    for batch in 1..=10 {
        queued.extend((0..100).map(|_| proxy.connect()));
        assert!(
            proxy.wait_for_count(event("accepted"), 1 + batch * 100, WAIT),
            "accepted {} of {}",
            proxy.count_logs(event("accepted")),
            1 + batch * 100
        );
    }
    let rss_queued = proxy.rss_kib();
    eprintln!("RSS with the holder {rss_before} KiB, with 1000 more queued {rss_queued} KiB");
    assert!(
        rss_queued < rss_before + 4 * 1024,
        "1000 queued connections grew RSS from {rss_before} KiB to {rss_queued} KiB (limit +4 MiB)"
    );
    assert_eq!(up.accepted(), 1, "a queued connection reached the upstream");

    // They all leave; none of them may ever reach the upstream.
    drop(queued);
    assert!(
        proxy.wait_for_count(outcome("abandoned"), 1000, WAIT),
        "abandoned {} of 1000",
        proxy.count_logs(outcome("abandoned"))
    );
    finish(holder);
    let mut s = proxy.connect();
    roundtrip(&mut s, b"after the crowd\n");
    finish(s);
    proxy.expect_log(closed_with(1002, "ok"), "closed conn=1002 outcome=ok");
    assert_eq!(up.accepted(), 2, "upstream connections");
}
