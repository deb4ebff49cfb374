//! A waiting client whose socket was reset leaves the queue at once as
//! `abandoned`, even though the kernel still holds the bytes it sent before
//! the reset: it is never activated and no hook runs for it.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use common::*;

/// Closes `stream` with a reset instead of a FIN (SO_LINGER on, timeout 0).
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the call and `linger` is a valid value of the
    // size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(stream);
}

/// `conn=` of every `hook_started` line, in order.
fn hook_conns(proxy: &Proxy) -> Vec<u64> {
    proxy
        .matching(event("hook_started"))
        .iter()
        .map(|l| num_field(l, "conn"))
        .collect()
}

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
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holding\n");

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
