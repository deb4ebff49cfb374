//! A library host keeps its own children: a lock supervising `--spawn` reaps
//! only its service's orphans, never the host's children (whatever their
//! process group), and leaves the host's process as it found it.

mod common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

use common::*;

fn is_subreaper() -> bool {
    let mut flag: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int through the pointer,
    // which points at a live local.
    let rc = unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int) };
    assert_eq!(rc, 0, "prctl: {}", std::io::Error::last_os_error());
    flag != 0
}

#[test]
fn the_hosts_children_in_their_own_group_keep_their_exit_status() {
    let port = unused_port();
    let lock = tcplock::Lock::builder()
        .listen("127.0.0.1:0")
        .upstream(format!("127.0.0.1:{port}"))
        .log_level(tcplock::LogLevel::Error)
        .spawn(format!(
            "exec python3 -m http.server {port} --bind 127.0.0.1"
        ))
        .build()
        .expect("build");
    let handle = lock.handle();
    let runner = std::thread::spawn(move || lock.run());
    assert!(
        wait_until(Duration::from_secs(20), || {
            handle.stats().service.state == Some(tcplock::ServiceStateName::Ready)
        }),
        "the service never got ready: {:?}",
        handle.stats().service
    );
    assert!(is_subreaper(), "supervising makes the process a subreaper");
    // The host's own child, in a process group of its own: its exit raises
    // SIGCHLD in the lock's loop too.
    let mut child = Command::new("sh")
        .args(["-c", "sleep 0.3; exit 7"])
        .process_group(0)
        .spawn()
        .expect("spawn the host's child");
    // Let it exit and stay unreaped (a zombie) while the lock's loop sees its
    // SIGCHLD; a lock that took it would reap it within this bounded wait.
    let stat = format!("/proc/{}/stat", child.id());
    let zombie = || {
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.starts_with(" Z"))
        })
    };
    let gone = || !std::path::Path::new(&stat).exists();
    assert!(
        wait_until(Duration::from_secs(10), || zombie() || gone()),
        "the child never exited"
    );
    let taken = wait_until(Duration::from_secs(2), gone);
    assert!(!taken, "the lock reaped the host's child");
    let status = child
        .try_wait()
        .expect("the host waits for its own child")
        .expect("it has exited");
    assert_eq!(
        status.code(),
        Some(7),
        "{status:?} (signal {:?})",
        status.signal()
    );
    handle.stop();
    let result = runner.join().expect("the loop thread");
    assert!(result.is_ok(), "{result:?}");
    assert!(!is_subreaper(), "the host's process is left as it was");
}
