//! Descriptors for activation are kept in reserve: with few descriptors and
//! a hook configured, accepting pauses before it would take what the hook
//! and the upstream connect need, so the queue keeps moving.

mod common;

use std::io::Write;

use common::*;

const CLIENTS: usize = 150;

#[test]
fn with_64_descriptors_and_a_hook_150_clients_are_served_in_order() {
    let upstream = Upstream::recording();
    let proxy = Proxy::start_with_fd_limit(64, &["-u", &upstream.arg(), "--on-activate", "true"]);
    let adjusted = proxy.expect_log(event("limit_adjusted"), "limit_adjusted at start");
    assert_eq!(
        field(&adjusted, "nofile").as_deref(),
        Some("64"),
        "{adjusted}"
    );
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
