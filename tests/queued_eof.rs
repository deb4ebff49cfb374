//! `--queued-eof keep|drop`: what a waiting client's end of stream does.
//! `keep` (the default) keeps its place and delivers what it sent on
//! activation; `drop` ends it as `abandoned` at once, without a hook run (for
//! request/response protocols whose clients never half-close). A reload
//! switches it, and turning `drop` on drops those whose end already came.

mod common;
mod hookkit;

use std::io::Write;
use std::net::{Shutdown, TcpStream};

use common::*;
use hookkit::*;

const REQUEST: &[u8] = b"request\n";

/// A client that sends its request and then half-closes, as a client that
/// gave up after sending would look from tcplock.
fn request_then_eof(proxy: &Proxy) -> TcpStream {
    let mut client = proxy.connect();
    client.write_all(REQUEST).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    client
}

/// Waits until the loop has handled what reached it before now: a marker
/// client connected after that is accepted in the same or a later turn. The
/// marker then leaves (`abandoned`). Needs `--log-level debug`.
fn let_the_loop_catch_up(proxy: &Proxy, marker_conn: u64) {
    let marker = proxy.connect();
    proxy.expect_log(conn_event("accepted", marker_conn), "marker accepted");
    drop(marker);
    proxy.expect_log(closed_with(marker_conn, "abandoned"), "marker left");
}

/// The holder's permit goes to conn `conn`, which gets its request echoed and
/// then the end of stream it sent.
fn expect_delivered(proxy: &Proxy, holder: TcpStream, mut client: TcpStream, conn: u64) {
    finish(holder);
    set_timeouts(&client, WAIT);
    assert_eq!(read_to_eof(&mut client).unwrap(), REQUEST);
    let closed = proxy.expect_log(closed_with(conn, "ok"), "the kept client served");
    assert_eq!(
        num_field(&closed, "bytes_up"),
        REQUEST.len() as u64,
        "{closed}"
    );
}

#[test]
fn keep_delivers_what_a_waiting_client_sent_before_its_end_of_stream() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        "true",
        "--log-level",
        "debug",
    ]);
    let holder = holding(&proxy);
    let client = request_then_eof(&proxy);
    let_the_loop_catch_up(&proxy, 3);
    assert_eq!(proxy.count_logs(conn_event("closed", 2)), 0, "conn 2 kept");
    expect_delivered(&proxy, holder, client, 2);
    assert_eq!(hook_conns(&proxy), vec![1, 2]);
}

#[test]
fn drop_abandons_a_waiting_client_at_its_end_of_stream_without_a_hook_run() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        "true",
        "--queued-eof",
        "drop",
    ]);
    let holder = holding(&proxy);
    let mut client = request_then_eof(&proxy);
    proxy.expect_log(closed_with(2, "abandoned"), "the dropped client");
    expect_closed(&mut client, WAIT).unwrap();

    finish(holder);
    let mut next = proxy.connect();
    roundtrip(&mut next, b"next\n");
    finish(next);
    proxy.expect_log(closed_with(3, "ok"), "conn 3 served");
    assert_eq!(hook_conns(&proxy), vec![1, 3], "no hook ran for conn 2");
    assert_eq!(upstream.accepted(), 2, "conn 2 never reached the upstream");
}

#[test]
fn a_reload_switches_between_keep_and_drop() {
    let upstream = Upstream::echo();
    let dir = TempDir::new("queued-eof");
    let config = |policy: &str| {
        format!(
            "listen = 127.0.0.1:0\nupstream = {}\non-activate = true\nlog-level = debug\n\
             queued-eof = {policy}\n",
            upstream.arg()
        )
    };
    let file = dir.write_atomic("tcplock.conf", &config("keep"));
    let proxy = Proxy::start_raw(&["-c", &file.to_string_lossy()]);
    let holder = holding(&proxy);
    let _kept_until_reload = request_then_eof(&proxy);
    let_the_loop_catch_up(&proxy, 3);

    // Turning drop on drops the client whose end of stream came while it was
    // kept, and every later one at once.
    dir.write_atomic("tcplock.conf", &config("drop"));
    proxy.signal("HUP");
    let reloaded = proxy.expect_log(event("reloaded"), "reloaded to drop");
    assert_eq!(field(&reloaded, "changed").as_deref(), Some("queued-eof"));
    proxy.expect_log(closed_with(2, "abandoned"), "conn 2 dropped at the reload");
    let _dropped = request_then_eof(&proxy);
    proxy.expect_log(closed_with(4, "abandoned"), "conn 4 dropped at once");

    dir.write_atomic("tcplock.conf", &config("keep"));
    proxy.signal("HUP");
    assert!(
        proxy.wait_for_count(event("reloaded"), 2, WAIT),
        "reloaded back to keep"
    );
    let kept = request_then_eof(&proxy);
    let_the_loop_catch_up(&proxy, 6);
    expect_delivered(&proxy, holder, kept, 5);
    assert_eq!(hook_conns(&proxy), vec![1, 5]);
}
