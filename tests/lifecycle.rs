//! Start-up and shutdown: the listening line, `-l PORT` binding loopback,
//! and SIGTERM exiting 0.
mod common;

use common::*;
use std::time::Duration;

#[test]
fn listening_line_reports_address_upstream_and_permits() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-n", "3"]);
    let line = proxy
        .logs()
        .into_iter()
        .find(|l| is_event(l, "listening"))
        .expect("listening");
    assert_eq!(field(&line, "level").as_deref(), Some("info"), "{line}");
    assert_eq!(field(&line, "upstream"), Some(up.arg()), "{line}");
    assert_eq!(field(&line, "permits").as_deref(), Some("3"), "{line}");
    assert!(proxy.addr().ip().is_loopback(), "{line}");
}

#[test]
fn bare_port_listens_on_loopback() {
    let up = Upstream::echo();
    let proxy = Proxy::start_raw(&["-l", "0", "-u", &up.arg()]);
    assert_eq!(
        proxy.addr().ip().to_string(),
        "127.0.0.1",
        "-l 0 must bind 127.0.0.1"
    );
    let mut s = proxy.connect();
    roundtrip(&mut s, b"ping\n");
    finish(s);
}

#[test]
fn sigterm_when_idle_exits_zero() {
    let up = Upstream::echo();
    let mut proxy = Proxy::start(&["-u", &up.arg()]);
    let status = proxy
        .stop(Duration::from_secs(5))
        .expect("tcplock did not exit within 5 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

#[test]
fn sigterm_with_a_live_connection_exits_zero() {
    // Whether a graceful stop lets the proxying connection finish or cuts
    // it, the process must exit 0 once that connection is over.
    let up = Upstream::echo();
    let mut proxy = Proxy::start(&["-u", &up.arg(), "-n", "1"]);
    let mut active = proxy.connect();
    roundtrip(&mut active, b"active\n");
    let queued = proxy.connect();
    proxy.signal("TERM");
    let _ = active.shutdown(std::net::Shutdown::Write);
    let _ = expect_closed(&mut active, Duration::from_secs(5));
    drop(queued);
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("no exit within 5 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}
