//! Every `libc` call and `unsafe` block of tcplock, behind safe functions.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// How many descriptors the process has open, counted once from
/// `/proc/self/fd` (not counting the one the count itself uses).
pub fn count_open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
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

/// Deepens a listening socket's accept backlog (the kernel caps it at
/// `net.core.somaxconn`). A burst of clients larger than the default 128 would
/// otherwise see SYNs dropped and retried a second later.
pub fn set_listen_backlog(listener: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen takes plain integers; the descriptor is borrowed, so it
    // stays open for the call. Calling it again on a listening socket only
    // changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns Nagle's algorithm off on a socket. Set on a listener, it is inherited
/// by every socket it accepts.
pub fn set_tcp_nodelay(socket: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int and the length passed is its size; the
    // descriptor is borrowed, so it stays open for the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
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

/// A pipe used as the relay buffer of one direction with `splice(2)`: bytes
/// move socket → pipe → socket inside the kernel, never through user memory.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe whose capacity is set to about
    /// `capacity` bytes (the kernel rounds up to a power-of-two number of pages).
    /// Returns the pipe and the capacity the kernel granted.
    pub fn with_capacity(capacity: usize) -> io::Result<(Pipe, usize)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us
        // alone; OwnedFd closes them on every path from here on.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(capacity).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
        let granted = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        let granted = if granted > 0 {
            granted as usize
        } else {
            // SAFETY: F_GETPIPE_SZ takes no argument and touches no memory of ours.
            let current = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if current <= 0 {
                return Err(io::Error::last_os_error());
            }
            current as usize
        };
        Ok((Pipe { read, write }, granted))
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe.
    /// `Ok(0)` is end of stream; [`io::ErrorKind::Unsupported`] means splice
    /// is refused here (by the kernel or a seccomp filter).
    pub fn fill_from(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe to the socket `to`.
    pub fn drain_to(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_fd(), to, len)
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (they are
    // borrowed), the offsets are null (sockets and pipes have none), and splice
    // touches no memory of ours.
    let moved = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        let error = io::Error::last_os_error();
        // A kernel without splice for these descriptors, or a sandbox whose
        // seccomp filter denies the call, says so with one of these; the
        // relay then copies instead.
        if matches!(
            error.raw_os_error(),
            Some(libc::EPERM | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
        ) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, error));
        }
        return Err(error);
    }
    Ok(moved as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pipe_moves_bytes_between_sockets() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut sender = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (receiver_in, _) = listener.accept().expect("accept");
        let mut out_peer =
            TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (out, _) = listener.accept().expect("accept");
        let (pipe, granted) = Pipe::with_capacity(16 * 1024).expect("pipe");
        assert!(granted >= 16 * 1024);
        sender.write_all(b"spliced").expect("write");
        sender
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut moved = 0;
        for _ in 0..100_000 {
            if moved >= 7 {
                break;
            }
            match pipe.fill_from(receiver_in.as_fd(), granted) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("splice in: {e}"),
            }
        }
        assert_eq!(pipe.drain_to(out.as_fd(), moved).expect("splice out"), 7);
        let mut got = [0u8; 7];
        out_peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"spliced");
    }

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
