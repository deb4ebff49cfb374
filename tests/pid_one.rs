//! tcplock as a container's entrypoint: PID 1 of its pid namespace inherits
//! every orphan and must reap them, not only its own hooks.

mod common;

use std::process::{Command, Stdio};

use common::{Proxy, Upstream, WAIT, closed_with, roundtrip, wait_until};

/// Whether this machine lets us make a pid namespace (root, no sandbox
/// forbidding it); the reason when it does not.
fn pid_namespaces_unavailable() -> Option<String> {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match probe {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "unshare --pid failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// (pid, state) of every process whose parent is `parent`.
fn children_of(parent: u32) -> Vec<(u32, char)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parens.
            let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
            let state = rest.next()?.chars().next()?;
            let ppid: u32 = rest.next()?.parse().ok()?;
            (ppid == parent).then_some((pid, state))
        })
        .collect()
}

#[test]
fn as_pid_one_the_orphans_of_hooks_are_reaped() {
    if let Some(reason) = pid_namespaces_unavailable() {
        // CI runs as root with util-linux installed: there a skip would hide
        // a test that never ran.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run under CI: {reason}"
        );
        println!("skipped: {reason}");
        return;
    }
    let upstream = Upstream::echo();
    // Each run leaves a short-lived background child, orphaned to PID 1 when
    // the hook exits, as a hook that starts a service does.
    let proxy = Proxy::start_as_pid_one(&[
        "-u",
        &upstream.arg(),
        "--on-activate",
        "sleep 0.1 >/dev/null 2>&1 & exit 0",
    ]);
    const RUNS: u64 = 5;
    for conn in 1..=RUNS {
        let mut client = proxy.connect();
        roundtrip(&mut client, b"served");
        drop(client);
        proxy.expect_log(closed_with(conn, "ok"), "a served connection");
    }
    let tcplock = proxy.pid();
    let mut left = Vec::new();
    // Every orphan has finished its 0.1 s long before this; once it has, only
    // a missing reap keeps it (as a zombie) among tcplock's children.
    let reaped = wait_until(WAIT, || {
        left = children_of(tcplock);
        left.is_empty()
    });
    assert!(
        reaped,
        "children of tcplock (pid {tcplock}) left after {WAIT:?}: {left:?} (Z = zombie)"
    );
    // Hooks were still reported correctly, not stolen by the orphan reaping.
    assert_eq!(
        proxy.count_logs(
            |line| line.contains("event=hook_exited") && line.contains("status=\"exit 0\"")
        ),
        RUNS as usize
    );
}
