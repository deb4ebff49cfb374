//! A reset on one side of a proxying connection reaches the other side as a
//! reset, never as a clean end of stream that would pass a truncated stream
//! off as complete. What had already arrived stays readable before the error.
//! Checked on every relay path.
//!
//! The resets are made with std only: a socket closed while unread bytes sit
//! in its receive queue makes the kernel send RST instead of FIN, and `peek`
//! proves the bytes are there before the drop.
mod common;

use common::*;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

/// What the upstream sends before its reset.
const DOWNLOAD: usize = 100 * KIB;
/// What the client sends before its reset.
const UPLOAD: usize = 64 * KIB;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn an_upstream_reset_reaches_the_client_as_a_reset_when_copying() {
    upstream_reset_reaches_the_client("off");
}

#[test]
fn an_upstream_reset_reaches_the_client_as_a_reset_when_splicing() {
    upstream_reset_reaches_the_client("on");
}

#[test]
fn an_upstream_reset_reaches_the_client_as_a_reset_in_auto_mode() {
    upstream_reset_reaches_the_client("auto");
}

#[test]
fn a_client_reset_reaches_the_upstream_as_a_reset_when_copying() {
    client_reset_reaches_the_upstream("off");
}

#[test]
fn a_client_reset_reaches_the_upstream_as_a_reset_when_splicing() {
    client_reset_reaches_the_upstream("on");
}

#[test]
fn a_client_reset_reaches_the_upstream_as_a_reset_in_auto_mode() {
    client_reset_reaches_the_upstream("auto");
}

/// The upstream reads one byte of a two-byte request, answers with
/// [`DOWNLOAD`] bytes and resets (the second byte is still unread).
fn upstream_reset_reaches_the_client(splice: &str) {
    let up = Upstream::spawn(|mut s, _active| {
        let mut first = [0u8; 1];
        if s.read_exact(&mut first).is_err() || s.write_all(&payload(DOWNLOAD)).is_err() {
            return;
        }
        let mut pending = [0u8; 1];
        if s.peek(&mut pending).is_ok_and(|n| n == 1) {
            drop(s); // RST
        }
    });
    let proxy = Proxy::start(&["-u", &up.arg(), "--splice", splice]);

    let mut s = proxy.connect();
    s.write_all(b"go").expect("send the request");
    let (ended, got) = expect_closed(&mut s, WAIT).expect("the connection ends");
    assert_eq!(
        ended,
        Ended::Reset,
        "--splice {splice}: the client saw a clean end of stream after {} of {DOWNLOAD} bytes \
         although the upstream reset",
        got.len()
    );
    assert!(
        got.len() <= DOWNLOAD && got[..] == payload(DOWNLOAD)[..got.len()],
        "--splice {splice}: the {} bytes before the reset are not the start of the answer",
        got.len()
    );
    proxy.expect_log(
        closed_with(1, "upstream_error"),
        "closed conn=1 outcome=upstream_error",
    );
}

/// The upstream greets with one byte, then reads to the end and records how
/// the stream ended; the client uploads [`UPLOAD`] bytes and resets (the
/// greeting still unread).
fn client_reset_reaches_the_upstream(splice: &str) {
    let up = Upstream::spawn(|mut s, active| {
        if s.write_all(b"G").is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 * KIB];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    active
                        .stats()
                        .bytes_in
                        .fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset".to_string(),
                Err(e) => break format!("error {e}"),
            }
        };
        active
            .stats()
            .records
            .lock()
            .unwrap()
            .push(end.into_bytes());
    });
    let proxy = Proxy::start(&["-u", &up.arg(), "--splice", splice]);

    let mut s = proxy.connect();
    s.write_all(&payload(UPLOAD)).expect("upload");
    let mut greeting = [0u8; 1];
    assert_eq!(
        s.peek(&mut greeting).expect("peek at the greeting"),
        1,
        "no unread greeting to force a reset"
    );
    drop(s); // RST

    assert!(
        wait_until(WAIT, || !up.records().is_empty()),
        "--splice {splice}: the upstream's read never ended after the client reset"
    );
    assert_eq!(
        up.records(),
        ["reset"],
        "--splice {splice}: the upstream saw the client's reset as this, after {} of {UPLOAD} bytes",
        up.bytes_in()
    );
    proxy.expect_log(
        closed_with(1, "client_error"),
        "closed conn=1 outcome=client_error",
    );
}
