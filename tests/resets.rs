//! A reset on either side mid-stream ends both sides of that connection
//! with the matching outcome, and the proxy goes on serving the next client.
//!
//! How the resets are made with std only (no SO_LINGER=0): a socket closed
//! while unread data sits in its receive queue makes the kernel send RST
//! instead of FIN. `peek` proves that data is pending before the drop.
//! - client reset: the upstream streams data without end; the client reads a
//!   little, peeks, and drops its socket.
//! - upstream reset: the client streams data without end; the upstream reads
//!   a little, peeks, and drops its socket.
mod common;

use common::*;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;

/// First byte picks the behaviour: `F` firehose (write until error),
/// `R` read a bit then reset, anything else echo.
fn mode_upstream() -> Upstream {
    Upstream::spawn(|mut s, active| {
        let mut first = [0u8; 1];
        if s.read_exact(&mut first).is_err() {
            active.stats().errors.fetch_add(1, Ordering::SeqCst);
            return;
        }
        match first[0] {
            b'F' => {
                let chunk = vec![0x5Au8; 64 * KIB];
                // Bounded: ends on the write error the reset causes, or after
                // 1 GiB, or on the 15 s write timeout.
                for _ in 0..(16 * 1024) {
                    if s.write_all(&chunk).is_err() {
                        active.stats().errors.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    active
                        .stats()
                        .bytes_out
                        .fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            }
            b'R' => {
                let mut buf = vec![0u8; 64 * KIB];
                let mut got = 0;
                while got < 256 * KIB {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                let mut one = [0u8; 1];
                let _ = s.peek(&mut one); // unread data pending: drop → RST
                drop(s);
            }
            other => {
                if s.write_all(&[other]).is_err() {
                    return;
                }
                echo_handler(s, active);
            }
        }
    })
}

fn next_client_is_served(proxy: &Proxy, conn: u64) {
    let mut s = proxy.connect();
    roundtrip(&mut s, b"Enext client\n");
    finish(s);
    proxy.expect_log(closed_with(conn, "ok"), "next client closed ok");
}

#[test]
fn client_reset_mid_stream_ends_both_sides() {
    let up = mode_upstream();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1"]);

    let mut s = proxy.connect();
    s.write_all(b"F").expect("write mode byte");
    let mut buf = vec![0u8; 64 * KIB];
    let mut got = 0;
    while got < 512 * KIB {
        let n = s.read(&mut buf).expect("read the stream");
        assert!(n > 0, "stream ended early");
        got += n;
    }
    let mut one = [0u8; 1];
    assert_eq!(
        s.peek(&mut one).expect("peek"),
        1,
        "no pending data to force a reset"
    );
    drop(s); // RST

    proxy.expect_log(
        closed_with(1, "client_error"),
        "closed conn=1 outcome=client_error",
    );
    assert!(
        wait_until(WAIT, || up.ended() >= 1),
        "the proxy did not close the upstream side after the client reset"
    );
    next_client_is_served(&proxy, 2);
}

#[test]
fn upstream_reset_mid_stream_ends_both_sides() {
    let up = mode_upstream();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1"]);

    let mut s = proxy.connect();
    s.write_all(b"R").expect("write mode byte");
    let chunk = vec![0x33u8; 64 * KIB];
    // Push until the proxy ends the connection; bounded by 256 MiB and the
    // socket's write timeout.
    let mut failure: Option<io::Error> = None;
    for _ in 0..4096 {
        if let Err(e) = s.write_all(&chunk) {
            failure = Some(e);
            break;
        }
    }
    let failure = failure.expect("client could write 256 MiB after the upstream reset");
    assert!(
        !matches!(
            failure.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "client write stalled instead of being cut: {failure}"
    );
    proxy.expect_log(
        closed_with(1, "upstream_error"),
        "closed conn=1 outcome=upstream_error",
    );
    next_client_is_served(&proxy, 2);
}

#[test]
fn client_gone_before_upstream_answers_is_not_fatal() {
    // A client that connects, sends, and vanishes at once; the proxy must
    // just close that connection and keep serving.
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1"]);
    for _ in 0..5 {
        let mut s: TcpStream = proxy.connect();
        let _ = s.write_all(b"bye");
    }
    assert!(
        proxy.wait_for_count(event("closed"), 5, WAIT),
        "five vanishing clients closed"
    );
    let mut s = proxy.connect();
    roundtrip(&mut s, b"after the vanishing ones\n");
    finish(s);
    proxy.expect_log(closed_with(6, "ok"), "closed conn=6 outcome=ok");
}
