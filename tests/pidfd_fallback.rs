//! Where the kernel (before 5.2) or a seccomp filter refuses clone(CLONE_PIDFD),
//! hooks are still watched, through SIGCHLD, and the log says so once.

mod common;

use common::{Proxy, Upstream, closed_with, event, roundtrip};

#[test]
fn without_pidfds_hooks_are_watched_through_sigchld() {
    let upstream = Upstream::echo();
    // Every `clone` fails as on an old kernel; std's spawn uses clone3 (or
    // vfork) and still works. The hook forks nothing: its shell runs a builtin.
    let proxy = Proxy::start_injecting(
        "clone:error=ENOSYS",
        &["-u", &upstream.arg(), "--on-activate", "exit 0"],
    );
    for conn in 1..=3 {
        let mut client = proxy.connect();
        roundtrip(&mut client, b"through the hook");
        drop(client);
        proxy.expect_log(closed_with(conn, "ok"), "a client served after its hook");
    }
    assert_eq!(proxy.count_logs(event("pidfd_unavailable")), 1);
    assert_eq!(
        proxy.count_logs(
            |line| line.contains("event=hook_exited") && line.contains("status=\"exit 0\"")
        ),
        3
    );
}
