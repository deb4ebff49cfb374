//! A waiting client whose socket was reset leaves the queue at once as
//! `abandoned`, even though the kernel still holds the bytes it sent before
//! the reset: it is never activated and no hook runs for it.

mod common;

use std::io::Write;

use common::*;

#[test]
fn a_queued_client_that_sent_a_byte_and_reset_is_abandoned_without_a_hook_run() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        "true",
        "--log-level",
        "debug",
    ]);
    // Conn 1 holds the only permit.
    let holder = holding(&proxy);

    let mut leaver = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "conn 2 accepted");
    leaver.write_all(b"x").unwrap();
    reset(leaver);
    proxy.expect_log(closed_with(2, "abandoned"), "the reset client abandoned");

    // Conn 3 is served next: the permit was never spent on conn 2.
    finish(holder);
    let mut next = proxy.connect();
    roundtrip(&mut next, b"next\n");
    finish(next);
    proxy.expect_log(closed_with(3, "ok"), "conn 3 served");
    assert_eq!(hook_conns(&proxy), vec![1, 3], "no hook ran for conn 2");
    assert_eq!(upstream.accepted(), 2, "conn 2 never reached the upstream");
}
