//! `--stall-warn`: a queue stuck behind permit holders that move no byte is
//! warned about once per stall; a holder that streams bytes is no stall.

mod common;

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;

fn start(upstream: &Upstream) -> Proxy {
    Proxy::start(&[
        "-u",
        &upstream.arg(),
        "-n",
        "1",
        "--stall-warn",
        "300ms",
        "--log-level",
        "debug",
    ])
}

/// Queues one client behind the holder (id 2).
fn queue_one(proxy: &Proxy) -> TcpStream {
    let c = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "queued client");
    c
}

#[test]
fn a_stuck_holder_is_warned_once_per_stall() {
    let upstream = Upstream::echo();
    let proxy = start(&upstream);
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"hold the permit\n");
    let _waiting = queue_one(&proxy);

    let warned = proxy.expect_log(event("queue_stalled"), "queue_stalled");
    assert!(warned.contains("level=warn"), "{warned}");
    assert_eq!(num_field(&warned, "holders"), 1, "{warned}");
    assert!(num_field(&warned, "waited_ms") >= 300, "{warned}");
    assert!(num_field(&warned, "idle_ms") >= 300, "{warned}");
    assert_eq!(
        field(&warned, "hint").as_deref(),
        Some("a client may hold more connections than there are permits; see --queue-timeout")
    );
    // Still stuck for several more checks: no second line.
    assert!(
        !proxy.wait_for_count(event("queue_stalled"), 2, Duration::from_millis(1_500)),
        "warned twice for one stall"
    );
    // The holder moves a byte: the stall clears, then comes back.
    roundtrip(&mut holder, b"x");
    assert!(
        proxy.wait_for_count(event("queue_stalled"), 2, WAIT),
        "a stall that came back was not warned"
    );
}

#[test]
fn a_busy_holder_is_no_stall() {
    let upstream = Upstream::echo();
    let proxy = start(&upstream);
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"streaming\n");
    let _waiting = queue_one(&proxy);

    let stop = Arc::new(AtomicBool::new(false));
    let streamer = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            // Bounded: at most 20 s of 10 ms exchanges.
            for _ in 0..2_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                roundtrip(&mut holder, b"tick\n");
                thread::sleep(Duration::from_millis(10));
            }
            holder
        })
    };
    assert!(
        proxy
            .wait_for_log(event("queue_stalled"), Duration::from_millis(1_500))
            .is_none(),
        "warned about a holder that streams bytes"
    );
    stop.store(true, Ordering::SeqCst);
    let _holder = streamer.join().expect("streamer");
    // Once it stops moving bytes, the same queue is stalled: the check runs.
    proxy.expect_log(event("queue_stalled"), "queue_stalled once idle");
}
