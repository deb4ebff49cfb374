//! Descriptors for activation are kept in reserve: with few descriptors and
//! a hook configured, accepting pauses before it would take what the hook
//! and the upstream connect need, so the queue keeps moving.

mod common;
mod hookkit;

use std::io::Write;

use common::*;

const CLIENTS: usize = 150;

#[test]
fn with_64_descriptors_and_a_hook_150_clients_are_served_in_order() {
    let upstream = Upstream::recording();
    let proxy = Proxy::start_with_fd_limit(64, &["-u", &upstream.arg(), "--on-activate", "true"]);
    let adjusted = proxy.expect_log(event("limit_adjusted"), "limit_adjusted at start");
    assert_field(&adjusted, "nofile", "64");
    assert!(
        num_field(&adjusted, "max_queue") < 64,
        "max-queue not lowered below the limit: {adjusted}"
    );

    // All connect at once: most wait in the kernel's backlog, not accepted.
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| proxy.connect()).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .write_all(format!("client {i}\n").as_bytes())
            .expect("send a request");
    }
    proxy.expect_log(
        |line: &str| is_event(line, "accept_paused") && line.contains("reason=fd_reserve"),
        "accept_paused reason=fd_reserve",
    );
    for (i, mut client) in clients.into_iter().enumerate() {
        let request = format!("client {i}\n");
        let answer = read_n(&mut client, request.len())
            .unwrap_or_else(|e| panic!("client {i} got no answer: {e}"));
        assert_eq!(answer, request.as_bytes(), "client {i}");
        finish(client);
    }

    assert!(
        proxy.wait_for_count(outcome("ok"), CLIENTS, WAIT),
        "all {CLIENTS} served"
    );
    let expected: Vec<String> = (0..CLIENTS).map(|i| format!("client {i}")).collect();
    assert_eq!(upstream.records(), expected, "served out of order");
    assert_eq!(proxy.count_logs(event("hook_failed")), 0, "a hook failed");
    assert_eq!(upstream.max_concurrent(), 1);
}

/// Descriptors open in the proxy, by /proc.
fn open_fds(proxy: &Proxy) -> usize {
    let dir = format!("/proc/{}/fd", proxy.pid());
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .count()
}

#[test]
fn control_and_metrics_connections_do_not_eat_the_activation_reserve() {
    let dir = hookkit::TempDir::new("fdctl");
    let sock = dir.join("ctl.sock");
    let sock_arg = sock.to_str().expect("utf-8 path").to_string();
    let upstream = Upstream::echo();
    let proxy = Proxy::start_with_fd_limit(
        64,
        &[
            "-u",
            &upstream.arg(),
            "--on-activate",
            "true",
            "--control",
            &sock_arg,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let mut holder = holding(&proxy);
    // Fill the queue up to the reserve; the rest wait in the backlog.
    let mut waiting: Vec<_> = (0..40).map(|_| proxy.connect()).collect();
    for (i, client) in waiting.iter_mut().enumerate() {
        client
            .write_all(format!("client {i}\n").as_bytes())
            .expect("send a request");
    }
    proxy.expect_log(
        |line: &str| is_event(line, "accept_paused") && line.contains("reason=fd_reserve"),
        "accept_paused reason=fd_reserve",
    );
    // Every control connection the server takes, each idle mid-line.
    let before = open_fds(&proxy);
    let sessions: Vec<_> = (0..16)
        .map(|_| {
            let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect control");
            s.write_all(b"stat").expect("half a command");
            s
        })
        .collect();
    assert!(
        wait_until(WAIT, || open_fds(&proxy) >= before + 16),
        "the 16 control connections were not accepted"
    );
    // The next activation's hook and upstream connect must still find
    // their descriptors.
    roundtrip(&mut holder, b"done\n");
    finish(holder);
    let mut first = waiting.remove(0);
    assert_eq!(
        read_n(&mut first, b"client 0\n".len()).expect("client 0 answered"),
        b"client 0\n"
    );
    assert_eq!(proxy.count_logs(event("hook_failed")), 0, "a hook failed");
    drop(sessions);
}
