//! Relaying: bytes sent while queued, half-close in both directions, the
//! upstream given as `-p` with the default host, and the byte counts logged.
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut p = Prng::new(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let n = (len - v.len()).min(64 * KIB);
        v.extend_from_slice(p.next_bytes(n));
    }
    v
}

#[test]
fn bytes_sent_while_queued_arrive_on_activation() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1", "--log-level", "debug"]);

    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"hold");

    let data = payload(32 * KIB, 7);
    let mut queued = proxy.connect();
    queued.write_all(&data).expect("write while queued");
    proxy.expect_log(conn_event("accepted", 2), "accepted conn=2");
    assert_eq!(up.accepted(), 1, "queued client reached the upstream early");
    finish(holder);

    let got = read_n(&mut queued, data.len()).expect("echo of the bytes sent while queued");
    assert!(got == data, "bytes sent while queued were altered");
    finish(queued);
    let closed = proxy.expect_log(closed_with(2, "ok"), "closed conn=2 outcome=ok");
    assert_eq!(
        num_field(&closed, "bytes_up"),
        data.len() as u64,
        "bytes_up: {closed}"
    );
    assert_eq!(
        num_field(&closed, "bytes_down"),
        data.len() as u64,
        "bytes_down: {closed}"
    );
}

#[test]
fn client_half_closed_while_queued_keeps_its_place() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "1", "--log-level", "debug"]);

    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"hold");

    let data = payload(10 * KIB, 8);
    let mut queued = proxy.connect();
    queued.write_all(&data).expect("write while queued");
    queued
        .shutdown(Shutdown::Write)
        .expect("shutdown(Write) while queued");
    proxy.expect_log(conn_event("accepted", 2), "accepted conn=2");
    // A later client is accepted after the FIN above reached the proxy.
    let later = proxy.connect();
    proxy.expect_log(conn_event("accepted", 3), "accepted conn=3");
    finish(holder);

    let got = read_to_eof(&mut queued).expect("reply to the half-closed queued client");
    assert!(
        got == data,
        "got {} of {} bytes back",
        got.len(),
        data.len()
    );
    proxy.expect_log(closed_with(2, "ok"), "closed conn=2 outcome=ok");
    assert_eq!(
        proxy.count_logs(conn_event("abandoned", 2)),
        0,
        "half-closed client was abandoned"
    );
    finish(later);
}

#[test]
fn client_half_close_request_then_full_response() {
    // The upstream answers only after it read the request to EOF, so the
    // answer can only arrive if the client's shutdown(Write) was forwarded
    // while the other direction stayed open.
    let up = Upstream::reply_after_eof(|req| {
        let mut answer = format!("got {} bytes\n", req.len()).into_bytes();
        answer.extend(req.iter().rev());
        answer
    });
    let proxy = Proxy::start(&["-u", &up.arg()]);

    let request = payload(200 * KIB, 9);
    let mut s = proxy.connect();
    s.write_all(&request).expect("write request");
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let answer = read_to_eof(&mut s).expect("read the answer to EOF");

    let mut want = format!("got {} bytes\n", request.len()).into_bytes();
    want.extend(request.iter().rev());
    assert_eq!(answer.len(), want.len(), "answer length");
    assert!(answer == want, "answer content");
    assert_eq!(up.records().len(), 1);
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(
        num_field(&closed, "bytes_up"),
        request.len() as u64,
        "{closed}"
    );
    assert_eq!(
        num_field(&closed, "bytes_down"),
        want.len() as u64,
        "{closed}"
    );
}

#[test]
fn upstream_half_close_still_carries_client_data() {
    // The upstream greets, half-closes, and only then reads what the client
    // sends: the client sees EOF but may still talk.
    let up = Upstream::spawn(|mut s, active| {
        if s.write_all(b"hello, then EOF\n").is_err() || s.shutdown(Shutdown::Write).is_err() {
            active.stats().errors.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let mut req = Vec::new();
        match s.read_to_end(&mut req) {
            Ok(_) => active.stats().records.lock().unwrap().push(req),
            Err(_) => {
                active.stats().errors.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let proxy = Proxy::start(&["-u", &up.arg()]);

    let mut s = proxy.connect();
    let greeting = read_to_eof(&mut s).expect("greeting then EOF");
    assert_eq!(greeting, b"hello, then EOF\n");
    let data = payload(100 * KIB, 10);
    s.write_all(&data)
        .expect("client still writes after the upstream's EOF");
    s.shutdown(Shutdown::Write).expect("shutdown(Write)");

    assert!(
        wait_until(WAIT, || !up.stats().records.lock().unwrap().is_empty()
            || up.errors() > 0),
        "upstream never got the client's data"
    );
    let got = up.stats().records.lock().unwrap()[0].clone();
    assert!(
        got == data,
        "upstream got {} of {} bytes",
        got.len(),
        data.len()
    );
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(
        num_field(&closed, "bytes_up"),
        data.len() as u64,
        "{closed}"
    );
    assert_eq!(num_field(&closed, "bytes_down"), 16, "{closed}");
}

#[test]
fn proxy_port_with_default_host_reaches_localhost() {
    // `-p PORT` alone means host `localhost`; the stand-in listens on
    // 127.0.0.1 only, so this also covers trying each resolved address.
    let up = Upstream::echo();
    let port = up.port().to_string();
    let proxy = Proxy::start(&["-p", &port]);
    let mut s = proxy.connect();
    roundtrip(&mut s, b"via localhost\n");
    finish(s);
    proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
}

#[test]
fn proxy_host_and_port_flags() {
    let up = Upstream::echo();
    let port = up.port().to_string();
    let proxy = Proxy::start(&["-h", "127.0.0.1", "-p", &port]);
    let mut s = proxy.connect();
    roundtrip(&mut s, b"via -h -p\n");
    finish(s);
    proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
}

#[test]
fn activated_line_names_the_client_and_wait() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg()]);
    let mut s = proxy.connect();
    let local = s.local_addr().expect("local addr");
    roundtrip(&mut s, b"x");
    let line = proxy.expect_log(conn_event("activated", 1), "activated conn=1");
    assert_eq!(field(&line, "client"), Some(local.to_string()), "{line}");
    num_field(&line, "waited_ms");
    assert_eq!(field(&line, "level").as_deref(), Some("info"), "{line}");
    finish(s);
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    num_field(&closed, "duration_ms");
    assert!(
        field(&closed, "ts").is_some_and(|t| t.ends_with('Z')),
        "ts in UTC: {closed}"
    );
}
