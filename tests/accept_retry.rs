//! A paused accept is retried on a timer: descriptors can come back without
//! any of tcplock's own connections closing (another process frees them, an
//! operator raises the limit), and accepting must not wait for a close that
//! may never come.

mod common;

use std::process::Command;

use common::*;

/// Sets the open-files limit of a running process, soft and hard.
fn set_fd_limit(pid: u32, soft: u32, hard: u32) {
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --pid {pid} failed: {status}");
}

#[test]
fn accepting_resumes_by_timer_when_descriptors_return_with_nothing_open() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg()]);

    // Fewer descriptors than tcplock already holds: the next accept fails.
    set_fd_limit(proxy.pid(), 8, 20_000);
    let mut first = proxy.connect();
    proxy.expect_log(
        event("accept_paused"),
        "accept_paused once descriptors run out",
    );

    // No connection of tcplock's is open, so no close will ever resume it.
    set_fd_limit(proxy.pid(), 20_000, 20_000);
    let mut second = proxy.connect();
    roundtrip(&mut first, b"the client that met the limit");
    finish(first);
    roundtrip(&mut second, b"the client after the limit was raised");
    finish(second);
    assert!(
        proxy.wait_for_count(outcome("ok"), 2, WAIT),
        "both clients served"
    );
}
