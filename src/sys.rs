//! Every `libc` call and `unsafe` block of tcplock, behind safe functions.

use std::io;

/// Raises the soft limit on open files to the hard limit, so the queue is bounded
/// by `--max-queue` rather than by the default 1024 descriptors. Returns the new
/// soft limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Sends SIGKILL to every process in the group `pgid` (a hook started as the
/// leader of its own group). A group that is already gone is not an error.
pub fn kill_process_group(pgid: u32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pgid <= 1 {
        // killpg(0) or killpg(1) would hit our own group or everything.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to kill group <= 1",
        ));
    }
    // SAFETY: killpg takes plain integers and touches no memory of ours.
    if unsafe { libc::killpg(pgid, libc::SIGKILL) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            return Err(error);
        }
    }
    Ok(())
}

/// Whether an accept error means "out of file descriptors": the loop then
/// stops accepting until a connection closes instead of spinning.
pub fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_limit_is_at_least_the_old_soft_limit() {
        let raised = raise_open_files_limit().expect("getrlimit works");
        assert!(raised >= 256, "soft limit {raised}");
    }

    #[test]
    fn killing_a_missing_group_is_fine_and_low_groups_are_refused() {
        assert!(kill_process_group(1).is_err());
        assert!(kill_process_group(0).is_err());
        // A pid far above pid_max names no group.
        assert!(kill_process_group(4_000_000).is_ok());
    }
}
