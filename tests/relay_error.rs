//! A splice refused while its pipe holds bytes fails the connection as
//! `relay_error`: neither peer did anything wrong, so neither is blamed.
//! Later connections copy. strace's fault injection plays the refusing
//! kernel: the first splice call (socket → pipe) works, every later one fails
//! with EPERM, so the bytes just moved into the pipe cannot get out.
mod common;

use common::*;
use std::io::Write;

#[test]
fn a_splice_refused_with_bytes_in_the_pipe_is_a_relay_error() {
    let up = Upstream::echo();
    let mut proxy = Proxy::start_injecting(
        "splice:error=EPERM:when=2+",
        &["-u", &up.arg(), "--splice", "on"],
    );

    let mut stuck = proxy.connect();
    stuck.write_all(&[0x42; 4 * KIB]).expect("send");
    let closed = proxy.expect_log(
        conn_event("closed", 1),
        "conn 1 closed after the refused splice",
    );
    assert_eq!(
        field(&closed, "outcome").as_deref(),
        Some("relay_error"),
        "{closed}"
    );
    let (ended, _) = expect_closed(&mut stuck, WAIT).expect("the client is cut off");
    assert_eq!(
        ended,
        Ended::Reset,
        "a cut-off stream must not look complete"
    );
    assert_eq!(
        proxy.count_logs(event("splice_refused")),
        1,
        "the refusal is logged once"
    );

    // Splicing is off from now on: the next client is copied, whole.
    let mut next = proxy.connect();
    roundtrip(&mut next, b"copied after the refusal\n");
    finish(next);
    proxy.expect_log(closed_with(2, "ok"), "closed conn=2 outcome=ok");
    assert!(
        proxy.stop(WAIT).is_some(),
        "tcplock under strace did not stop"
    );
}
