//! Every `libc` call and `unsafe` block of tcplock, behind safe functions.

use std::ffi::CStr;
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

/// The kernel's clock ticks per second (the unit of CPU times in
/// `/proc/self/stat`) and the page size (of its memory counts); 0 for one
/// that cannot be read.
pub fn clock_ticks_and_page_size() -> (u64, u64) {
    // SAFETY: sysconf takes a plain integer and touches no memory of ours.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (
        u64::try_from(ticks).unwrap_or(0),
        u64::try_from(page).unwrap_or(0),
    )
}

/// Sends SIGKILL to every process in the group `pgid` (a hook started as the
/// leader of its own group). A group that is already gone is not an error.
pub fn kill_process_group(pgid: u32) -> io::Result<()> {
    signal_process_group(pgid, libc::SIGKILL)
}

/// Sends `signal` to every process in the group `pgid`. A group that is
/// already gone is not an error.
pub fn signal_process_group(pgid: u32, signal: libc::c_int) -> io::Result<()> {
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
    gone_is_fine(unsafe { libc::killpg(pgid, signal) })
}

/// The result of a kill(2)-family call: a target already gone is not an
/// error.
fn gone_is_fine(result: libc::c_int) -> io::Result<()> {
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            return Err(error);
        }
    }
    Ok(())
}

/// Opens a file for reading without blocking on it: opening a FIFO with no
/// writer, or a device, must not stall the caller (the loop re-reads the config
/// file on SIGHUP). The caller checks what it opened before reading.
pub fn open_nonblocking(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
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
    set_option(socket, libc::IPPROTO_TCP, libc::TCP_NODELAY, &on)
}

/// Makes closing a socket reset the connection (`SO_LINGER` on with a zero
/// timeout): the peer gets RST instead of end of stream, and reads an error
/// after what it had already received. Bytes not yet sent are dropped.
/// std's `TcpStream::set_linger` is unstable and mio has none.
pub fn set_reset_on_close(socket: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(socket, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// `setsockopt` with `value` as the option's value.
fn set_option<T>(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option value too large"))?;
    // SAFETY: `value` is live and `len` is its size; the descriptor is
    // borrowed, so it stays open for the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// Whether [`take_listen_fd`] has handed out the passed descriptor.
static LISTEN_FD_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes ownership of descriptor 3, which a service manager's socket
/// activation (`LISTEN_PID` naming this process, `LISTEN_FDS=1`) passes to
/// the process, and marks it close-on-exec so no hook or child inherits the
/// listening socket. The caller checks the environment first: only then is
/// descriptor 3 the process's to take. At most once per process; a second
/// call, or a descriptor 3 that is not open, is an error.
pub fn take_listen_fd() -> io::Result<OwnedFd> {
    use std::sync::atomic::Ordering;
    let fd = LISTEN_FDS_START;
    // SAFETY: F_GETFD only reads the descriptor's flags; an unused number
    // fails with EBADF and touches nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if LISTEN_FD_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the passed socket was taken already",
        ));
    }
    // SAFETY: as above, on a descriptor just seen open; only its flags change.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: descriptor 3 is open, the socket-activation protocol the caller
    // checked hands it to this process, and the flag above lets only one
    // owner ever be made from it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a socket is, as the kernel reports it: for a descriptor passed in
/// from outside, before it is used as a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketKind {
    /// `SO_TYPE` is `SOCK_STREAM`.
    pub stream: bool,
    /// `SO_ACCEPTCONN`: `listen` was called on it.
    pub listening: bool,
    /// `SO_DOMAIN` is `AF_INET` or `AF_INET6`.
    pub inet: bool,
}

/// [`SocketKind`] of `socket`; a descriptor that is no socket fails with
/// `ENOTSOCK`.
pub fn socket_kind(socket: BorrowedFd<'_>) -> io::Result<SocketKind> {
    let kind = get_option_int(socket, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let listening = get_option_int(socket, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)?;
    let domain = get_option_int(socket, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    Ok(SocketKind {
        stream: kind == libc::SOCK_STREAM,
        listening: listening != 0,
        inet: domain == libc::AF_INET || domain == libc::AF_INET6,
    })
}

/// `getsockopt` of an `int` option.
fn get_option_int(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and writable and `len` is the size
    // of `value`; the descriptor is borrowed, so it stays open for the call.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd's `MONOTONIC_USEC=`
/// is read on (std's `Instant` uses it too but does not show its value).
pub fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the
    // call; CLOCK_MONOTONIC always exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return 0;
    }
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    secs.saturating_mul(1_000_000).saturating_add(micros)
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

/// A child started with a pidfd of its own: [`spawn_watched`].
#[derive(Debug)]
pub struct WatchedChild {
    pub pid: u32,
    /// Readable once the child has exited; signals sent through it can never
    /// reach another process that reused the pid.
    pub pidfd: OwnedFd,
}

/// What a child needs prepared before `clone`, since the child may only make
/// async-signal-safe calls (no allocation) between `clone` and `execve`.
pub struct ExecSpec<'a> {
    pub program: &'a CStr,
    pub argv: &'a [&'a CStr],
    /// `KEY=VALUE` entries.
    pub envp: &'a [&'a CStr],
    /// Becomes the child's stdin.
    pub stdin: BorrowedFd<'a>,
    /// Becomes the child's stdout; `None`: our stderr.
    pub stdout: Option<BorrowedFd<'a>>,
    /// Becomes the child's stderr; `None`: our stderr.
    pub stderr: Option<BorrowedFd<'a>>,
    /// Lead a new session (`setsid`), not only a new process group.
    pub new_session: bool,
    /// `PR_SET_PDEATHSIG`: the signal the child gets when the thread that
    /// spawned it ends (with tcplock's loop, or the whole process, killed).
    pub parent_death_signal: Option<libc::c_int>,
}

/// Starts `spec.program` as the leader of a new process group (or session),
/// its stdout and stderr where `spec` says, with an empty signal mask and
/// SIGCHLD and SIGPIPE at their defaults whatever the host set.
///
/// `clone(CLONE_PIDFD)` hands back a pidfd atomically (no window in which the
/// pid could exit and be reused before we hold it), and an exit signal of 0
/// keeps the child out of the process-wide SIGCHLD business: no signal
/// reaches the host's handler, a host that ignores SIGCHLD does not auto-reap
/// it, and a host's `waitpid(-1)` does not take it (only `__WALL` waits do).
/// An error whose raw code is `ENOSYS`, `EINVAL` or `EPERM` means the kernel
/// (before 5.2) or a seccomp filter refuses the call: [`is_pidfd_unsupported`].
/// A failed `execve` in the child is an error with no raw code (it names the
/// program), so it is never taken for that.
pub fn spawn_watched(spec: &ExecSpec<'_>) -> io::Result<WatchedChild> {
    // Built before the clone: the child may not allocate.
    let argv = null_terminated(spec.argv);
    let envp = null_terminated(spec.envp);
    // SAFETY: getpid takes nothing and cannot fail.
    let parent = unsafe { libc::getpid() };
    let exec = ExecArgs {
        program: spec.program,
        argv: &argv,
        envp: &envp,
        stdin: spec.stdin.as_raw_fd(),
        stdout: spec.stdout.map_or(STDERR, |fd| fd.as_raw_fd()),
        stderr: spec.stderr.map_or(STDERR, |fd| fd.as_raw_fd()),
        new_session: spec.new_session,
        parent_death_signal: spec.parent_death_signal.unwrap_or(0),
        parent,
    };
    let mut exec_errors = [0 as libc::c_int; 2];
    // SAFETY: `exec_errors` is a writable array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(exec_errors.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    let (error_read, error_write) = unsafe {
        (
            OwnedFd::from_raw_fd(exec_errors[0]),
            OwnedFd::from_raw_fd(exec_errors[1]),
        )
    };
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_PIDFD as libc::c_ulong;
    // SAFETY: without CLONE_VM and with a null stack this is a fork: the child
    // runs on a copy of our memory. The third argument (parent_tid on every
    // architecture) is where CLONE_PIDFD stores the pidfd; `pidfd` outlives
    // the call. The child never returns from `exec_child`.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; `spec` points into memory
        // copied with us, and `exec_child` makes only async-signal-safe calls.
        unsafe { exec_child(&exec, error_write.as_raw_fd()) }
    }
    // SAFETY: clone succeeded with CLONE_PIDFD, so `pidfd` is an open
    // descriptor (close-on-exec) that only we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(error_write);
    let pid = pid as u32;
    // The child writes errno here if execve fails; a successful exec closes
    // the pipe (close-on-exec), so this read ends at once either way.
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < errno.len() {
        // SAFETY: the buffer is live and writable for the length passed.
        let n = unsafe {
            libc::read(
                error_read.as_raw_fd(),
                errno[got..].as_mut_ptr().cast(),
                errno.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    if got == errno.len() {
        // The child is gone or going: reap it so it leaves no zombie.
        let _ = wait_pid(pid, true);
        let error = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
        return Err(io::Error::new(
            error.kind(),
            format!("exec {}: {error}", spec.program.to_string_lossy()),
        ));
    }
    Ok(WatchedChild { pid, pidfd })
}

/// Makes `command` start its child as the leader of a new session, with
/// `parent_death_signal` as [`ExecSpec::parent_death_signal`] does: for
/// std's spawn (clone3 or vfork, then SIGCHLD at exit), where a kernel or a
/// seccomp filter refuses clone(CLONE_PIDFD).
pub fn in_new_session(command: &mut std::process::Command, parent_death_signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid takes nothing and cannot fail.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec; it makes
    // only async-signal-safe calls (setsid, prctl, getppid, kill) on values
    // copied into it, and allocates nothing (an OS error is a plain code).
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, parent_death_signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl: take the signal now.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), parent_death_signal);
            }
            Ok(())
        });
    }
}

/// The cloned child: reset what the host may have changed, then exec.
///
/// # Safety
/// Only to be called in a child just returned from `clone`; everything `spec`
/// points to must be valid.
unsafe fn exec_child(spec: &ExecArgs<'_>, error_fd: libc::c_int) -> ! {
    // SAFETY (whole block): only async-signal-safe calls on memory prepared
    // before the clone; the child ends in execve or _exit.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Ignored dispositions survive exec; a hook's shell needs its own
        // children's exits and a normal SIGPIPE.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let grouped = if spec.new_session {
            libc::setsid() >= 0
        } else {
            libc::setpgid(0, 0) == 0
        };
        if spec.parent_death_signal != 0 {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                spec.parent_death_signal as libc::c_ulong,
            );
            // The parent may have died before the line above: then no
            // signal will ever come, so take it now.
            if libc::getppid() != spec.parent {
                libc::kill(libc::getpid(), spec.parent_death_signal);
                libc::_exit(127);
            }
        }
        // Copies above 2 first, so that placing one source cannot overwrite
        // another that happens to sit at 0, 1 or 2; dup2 clears the copies'
        // close-on-exec on the targets.
        let sources = [spec.stdin, spec.stdout, spec.stderr];
        let mut copies = [-1 as libc::c_int; 3];
        // Each step only after the last succeeded: errno then names the
        // first failure.
        let mut placed = grouped;
        for (copy, source) in copies.iter_mut().zip(sources) {
            if placed {
                *copy = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, 3);
                placed = *copy >= 0;
            }
        }
        for (target, copy) in copies.into_iter().enumerate() {
            placed = placed && libc::dup2(copy, target as libc::c_int) == target as libc::c_int;
        }
        if placed {
            libc::execve(
                spec.program.as_ptr(),
                spec.argv.as_ptr(),
                spec.envp.as_ptr(),
            );
        }
        let errno = *libc::__errno_location();
        libc::write(error_fd, (&errno as *const libc::c_int).cast(), 4);
        libc::_exit(127)
    }
}

/// What the child execs, as raw pointers into the caller's strings.
struct ExecArgs<'a> {
    program: &'a CStr,
    /// Null-terminated.
    argv: &'a [*const libc::c_char],
    /// Null-terminated.
    envp: &'a [*const libc::c_char],
    /// Descriptors that become 0, 1 and 2; open for as long as the spec's
    /// borrows last, which covers the clone.
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    new_session: bool,
    /// 0: none.
    parent_death_signal: libc::c_int,
    /// Our pid, for the child to check it still has its parent.
    parent: libc::pid_t,
}

fn null_terminated(strings: &[&CStr]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect()
}

/// Whether [`spawn_watched`] failed because pidfds are not available here.
pub fn is_pidfd_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::EPERM)
    )
}

/// Reaps `child` if it has exited (or waits for it when `block`), returning
/// its raw wait status. `__WALL` because its exit signal is not SIGCHLD.
pub fn wait_exited(child: &WatchedChild, block: bool) -> io::Result<Option<i32>> {
    wait_pid(child.pid, block)
}

/// Reaps our child `pid` if it has exited, without blocking: its raw wait
/// status, `None` while it runs. For a child started by std's spawn, or an
/// exited child (zombie) found by [`scan_processes`].
pub fn reap_pid(pid: u32) -> io::Result<Option<i32>> {
    wait_pid(pid, false)
}

fn wait_pid(pid: u32, block: bool) -> io::Result<Option<i32>> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a live, writable int for the call. The pid
        // cannot name another process: our unreaped child keeps it.
        let reaped = unsafe { libc::waitpid(pid, &mut status, flags) };
        match reaped {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(status)),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// The wait status a pidfd remembers for its exited process, even after
/// someone else reaped it (a host that ignores SIGCHLD has the kernel reap
/// children at once). `PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`, Linux 6.15+;
/// `None` where the kernel cannot tell.
pub fn pidfd_exit_status(pidfd: BorrowedFd<'_>) -> Option<i32> {
    /// `struct pidfd_info` of <linux/pidfd.h>, its first version (64 bytes).
    #[repr(C)]
    #[derive(Default)]
    struct PidfdInfo {
        mask: u64,
        cgroupid: u64,
        ids: [u32; 11],
        exit_code: i32,
        coredump_mask: u32,
        spare: u32,
    }
    const PIDFD_INFO_EXIT: u64 = 1 << 3;
    // _IOWR(0xFF, 11, struct pidfd_info)
    const PIDFD_GET_INFO: libc::c_ulong =
        (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: `info` is a live, writable struct of the size the request
    // encodes; the descriptor is borrowed, so open for the call.
    let result = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, &mut info) };
    (result == 0 && info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code)
}

/// Sends `signal` through the pidfd (0 only asks whether the process is
/// still there): it reaches this process and no other, even one that reused
/// its pid. `Ok(false)` when the process is gone (reaped).
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<bool> {
    // SAFETY: pidfd_send_signal takes a borrowed (so open) descriptor, a
    // signal number, a null siginfo and zero flags; it touches no memory of ours.
    let result = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            return Ok(false);
        }
        return Err(error);
    }
    Ok(true)
}

/// SIGPIPE held off the calling thread while this lives.
///
/// `splice` (and `writev`) into a socket the peer reset raises SIGPIPE, and no
/// flag suppresses it as `MSG_NOSIGNAL` does for `send`. An embedding program
/// may have SIGPIPE at its default (death, exit 141), and changing its
/// process-wide disposition is not ours to do; blocking the signal on the loop
/// thread only affects that thread. The kernel directs this SIGPIPE at the
/// thread that wrote, so it stays pending here, never reaches another thread,
/// and the failing call still returns EPIPE. Dropping the guard discards a
/// pending SIGPIPE before unblocking, so it cannot strike later.
pub struct SigpipeBlocked {
    was_blocked: bool,
}

/// Blocks SIGPIPE on this thread until the guard is dropped.
pub fn block_sigpipe() -> io::Result<SigpipeBlocked> {
    let set = sigpipe_set();
    // SAFETY: sigset_t is plain data for which all zeroes is a valid value.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are live for the call; pthread_sigmask changes only
    // this thread's mask.
    let result = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
    if result != 0 {
        return Err(io::Error::from_raw_os_error(result));
    }
    // SAFETY: `previous` was filled in by pthread_sigmask above.
    let was_blocked = unsafe { libc::sigismember(&previous, libc::SIGPIPE) } == 1;
    Ok(SigpipeBlocked { was_blocked })
}

impl Drop for SigpipeBlocked {
    fn drop(&mut self) {
        if self.was_blocked {
            return;
        }
        let set = sigpipe_set();
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // Standard signals do not queue, so one pending SIGPIPE is all there
        // can be; the bound only guards against a kernel that says otherwise.
        for _ in 0..4 {
            // SAFETY: `set` and `zero` are live for the call and the siginfo
            // pointer may be null; a zero timeout makes it return at once.
            if unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) } < 0 {
                break;
            }
        }
        // SAFETY: `set` is live for the call; this changes this thread's mask only.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

fn sigpipe_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

/// Whether this process is PID 1 of its pid namespace (a container's
/// entrypoint), the one that inherits every orphan.
pub fn is_pid_one() -> bool {
    // SAFETY: getpid takes nothing and cannot fail.
    unsafe { libc::getpid() == 1 }
}

/// Reaps one exited child that exits with SIGCHLD (an orphan handed to PID 1,
/// or a child started without a pidfd), without blocking: its pid and raw
/// wait status, or `None` when no such child has exited. Children started by
/// [`spawn_watched`] are not taken: their exit signal is not SIGCHLD.
pub fn reap_any_child() -> Option<(u32, i32)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a live, writable int for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            return Some((pid as u32, status));
        }
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// Sends `signal` to the process `pid`. A process that is already gone is
/// not an error; pids 0 and 1 (and -1) are refused.
pub fn signal_pid(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|pid| *pid > 1)
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "refusing to signal pid <= 1")
        })?;
    // SAFETY: kill takes plain integers and touches no memory of ours.
    gone_is_fine(unsafe { libc::kill(pid, signal) })
}

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphans
/// of its descendants are re-parented to it instead of to init, so a
/// supervised service's daemonised children stay ours to count and reap.
pub fn set_child_subreaper(on: bool) -> io::Result<()> {
    // SAFETY: prctl with these options takes plain integers only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, libc::c_ulong::from(on)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe for a child's output: the read end (ours) non-blocking, the write
/// end (the child's) blocking as programs expect; both close-on-exec (the
/// spawn places the write end on the child's 1 or 2).
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_GETFL/F_SETFL take and return plain integers; the
    // descriptor is open (owned above).
    let flags = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok((read, write))
}

/// This process's pid and process group.
pub fn own_ids() -> (u32, u32) {
    // SAFETY: getpid and getpgrp take nothing and cannot fail.
    let (pid, pgrp) = unsafe { (libc::getpid(), libc::getpgrp()) };
    (pid as u32, pgrp as u32)
}

/// The fields of `/proc/PID/stat` the supervisor reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// `R`, `S`, `D`, `Z` (zombie), ...
    pub state: u8,
    pub ppid: u32,
    pub pgrp: u32,
    pub session: u32,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

impl ProcStat {
    /// Exited and not yet reaped (or being reaped): no longer running and
    /// holding no memory.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses one `/proc/PID/stat` line. The command name sits in parentheses
/// and may itself hold spaces and parentheses, so the fields after it are
/// counted from its last `)`.
pub fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = line[..open].trim().parse().ok()?;
    // Fields 3 (state) onwards; `rest[k]` is field k + 3 of proc(5).
    let rest: Vec<&str> = line[close + 1..].split_ascii_whitespace().collect();
    let field = |number: usize| rest.get(number - 3).copied();
    let state = *field(3)?.as_bytes().first()?;
    Some(ProcStat {
        pid,
        state,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        session: field(6)?.parse().ok()?,
        // A negative rss is not a thing, but the field is signed: read 0.
        rss_pages: field(24)?.parse::<i64>().ok()?.max(0) as u64,
    })
}

/// Every process in `/proc` that `keep` accepts. A process that goes away
/// while being read is skipped.
pub fn scan_processes(mut keep: impl FnMut(&ProcStat) -> bool) -> io::Result<Vec<ProcStat>> {
    use std::io::Read;
    let mut found = Vec::new();
    let mut text = String::with_capacity(512);
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        text.clear();
        let mut path = entry.path();
        path.push("stat");
        let Ok(mut file) = std::fs::File::open(&path) else {
            continue;
        };
        if file.read_to_string(&mut text).is_err() {
            continue;
        }
        if let Some(stat) = parse_proc_stat(&text)
            && keep(&stat)
        {
            found.push(stat);
        }
    }
    Ok(found)
}

/// Every descendant of `root` (children, their children, ...), found
/// through `/proc/PID/task/TID/children` rather than a scan of every
/// process: the cost follows the size of the tree, not of the host. An
/// error when the kernel does not list children (`CONFIG_PROC_CHILDREN`);
/// a process that goes away while being read is skipped. At most `limit`.
pub fn descendants(root: u32, limit: usize) -> io::Result<Vec<ProcStat>> {
    let mut found: Vec<ProcStat> = Vec::new();
    let (mut children, mut stat) = (String::new(), String::new());
    let mut queue = std::collections::VecDeque::from([root]);
    let mut listed_any = false;
    while let Some(pid) = queue.pop_front() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let mut path = task.path();
            path.push("children");
            match read_into(&path, &mut children) {
                Ok(()) => listed_any = true,
                // The root's first list tells whether the kernel has them.
                Err(e) if !listed_any => return Err(e),
                Err(_) => continue,
            }
            for child in children.split_ascii_whitespace() {
                let Ok(child) = child.parse() else { continue };
                if found.len() >= limit {
                    return Ok(found);
                }
                let path = std::path::PathBuf::from(format!("/proc/{child}/stat"));
                if read_into(&path, &mut stat).is_ok()
                    && let Some(parsed) = parse_proc_stat(&stat)
                {
                    found.push(parsed);
                    queue.push_back(child);
                }
            }
        }
    }
    if !listed_any {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("/proc/{root}/task/*/children not readable"),
        ));
    }
    Ok(found)
}

fn read_into(path: &std::path::Path, text: &mut String) -> io::Result<()> {
    use std::io::Read;
    text.clear();
    std::fs::File::open(path)?.read_to_string(text)?;
    Ok(())
}

/// The size of a memory page in KiB, for [`ProcStat::rss_pages`].
pub fn page_size_kib() -> u64 {
    match clock_ticks_and_page_size().1 {
        0 => 4,
        size => size / 1024,
    }
}

/// Where log lines go: stderr, written without ever blocking the caller.
///
/// Setting O_NONBLOCK on fd 2 itself would change the file description we
/// share with our parent, its terminal and every hook, and make their writes
/// fail with EAGAIN. Instead, by what stderr is:
/// - a pipe, FIFO or terminal: reopened through `/proc/self/fd/2`, which gives
///   a new description of the same pipe or terminal whose O_NONBLOCK is ours;
/// - a socket (journald's stdout stream): `send` with `MSG_DONTWAIT`, a
///   per-call flag;
/// - a regular file: written as is; a file does not stall on a slow reader.
///
/// If the reopen fails, a write is only tried after `poll` says there is
/// room, and then at most `PIPE_BUF` bytes, which a pipe with room takes
/// whole.
pub struct LogSink {
    kind: SinkKind,
}

enum SinkKind {
    Reopened(OwnedFd),
    Socket,
    File,
    PollFirst,
}

const STDERR: libc::c_int = 2;

impl LogSink {
    /// The sink for this process's stderr.
    pub fn stderr() -> LogSink {
        // SAFETY: stat is plain data for which all zeroes is a valid value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is live and writable for the call.
        if unsafe { libc::fstat(STDERR, &mut stat) } != 0 {
            return LogSink {
                kind: SinkKind::PollFirst,
            };
        }
        let kind = match stat.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => SinkKind::Socket,
            libc::S_IFIFO | libc::S_IFCHR => match reopen_stderr() {
                Ok(fd) => SinkKind::Reopened(fd),
                Err(_) => SinkKind::PollFirst,
            },
            libc::S_IFREG => SinkKind::File,
            _ => SinkKind::PollFirst,
        };
        LogSink { kind }
    }

    /// Writes what fits now; [`io::ErrorKind::WouldBlock`] when nothing does.
    pub fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        loop {
            let written = match &self.kind {
                // SAFETY (these four): the buffer is live for the length
                // passed, and the descriptor is open (ours, or fd 2).
                SinkKind::Reopened(fd) => unsafe {
                    libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len())
                },
                SinkKind::Socket => unsafe {
                    libc::send(
                        STDERR,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                },
                SinkKind::File => unsafe {
                    libc::write(STDERR, bytes.as_ptr().cast(), bytes.len())
                },
                SinkKind::PollFirst => {
                    if !poll_writable(STDERR, 0) {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    let len = bytes.len().min(libc::PIPE_BUF);
                    unsafe { libc::write(STDERR, bytes.as_ptr().cast(), len) }
                }
            };
            if written >= 0 {
                return Ok(written as usize);
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }

    /// The descriptor to watch for room, if the sink can run out of it and
    /// the poll can watch it.
    pub fn watch_fd(&self) -> Option<libc::c_int> {
        match &self.kind {
            SinkKind::Reopened(fd) => Some(fd.as_raw_fd()),
            SinkKind::Socket | SinkKind::PollFirst => Some(STDERR),
            SinkKind::File => None,
        }
    }

    /// Waits up to `timeout_ms` for room to write.
    pub fn wait_writable(&self, timeout_ms: i32) -> bool {
        self.watch_fd()
            .is_none_or(|fd| poll_writable(fd, timeout_ms))
    }
}

fn reopen_stderr() -> io::Result<OwnedFd> {
    let path = c"/proc/self/fd/2";
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open succeeded, so `fd` is an open descriptor only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn poll_writable(fd: libc::c_int, timeout_ms: i32) -> bool {
    let mut watched = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one live, writable pollfd, and the count passed is 1.
    let ready = unsafe { libc::poll(&mut watched, 1, timeout_ms) };
    ready > 0 && watched.revents & libc::POLLOUT != 0
}

/// A listening Unix stream socket bound at `path` (which must not exist),
/// non-blocking and close-on-exec, whose file is created with mode 0600
/// whatever the umask: the socket is `fchmod`ed before `bind`, and Linux
/// creates the file with the socket's mode, so it is never wider.
pub fn bind_private_unix_listener(
    path: &std::path::Path,
    backlog: i32,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a valid Unix socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `socket` is an open descriptor for the duration of the call.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` lies within it.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `socket` is an open, bound socket.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog) } != 0 {
        let error = io::Error::last_os_error();
        // The file is ours, made by the bind just now.
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    Ok(std::os::unix::net::UnixListener::from(socket))
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
    fn a_socket_set_to_reset_on_close_resets_its_peer() {
        use std::io::Read;
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut peer = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (closing, _) = listener.accept().expect("accept");
        set_reset_on_close(closing.as_fd()).expect("SO_LINGER");
        drop(closing);
        let mut byte = [0u8; 1];
        let error = peer
            .read(&mut byte)
            .expect_err("a reset, not end of stream");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn a_watched_child_reports_its_exit_and_a_failed_exec_is_an_error() {
        let shell = c"/bin/sh";
        let (dash_c, script) = (c"-c", c"exit 3");
        let argv = [shell, dash_c, script];
        let envp: [&CStr; 0] = [];
        let stdin = std::fs::File::open("/dev/null").expect("/dev/null");
        let spec = ExecSpec {
            program: shell,
            argv: &argv,
            envp: &envp,
            stdin: stdin.as_fd(),
            stdout: None,
            stderr: None,
            new_session: false,
            parent_death_signal: None,
        };
        let child = spawn_watched(&spec).expect("spawn");
        let status = wait_exited(&child, true).expect("wait").expect("exited");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3,
            "{status:#x}"
        );
        let missing = c"/nonexistent/tcplock-test";
        let spec = ExecSpec {
            program: missing,
            ..spec
        };
        let error = spawn_watched(&spec).expect_err("no such program");
        // Not to be taken for a kernel without pidfds.
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(!is_pidfd_unsupported(&error), "{error}");
        assert!(
            error.to_string().contains("/nonexistent/tcplock-test"),
            "{error}"
        );
    }

    #[test]
    fn proc_stat_lines_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let plain = "16647 (cat) R 16643 16643 9908 0 -1 4194304 99 0 0 0 0 0 0 0 20 0 1 0 \
                     925294 3133440 413 18446744073709551615 94891352535040 0 0 0 0 0 0 0 0 0 \
                     17 1 0 0 0 0 0";
        assert_eq!(
            parse_proc_stat(plain),
            Some(ProcStat {
                pid: 16647,
                state: b'R',
                ppid: 16643,
                pgrp: 16643,
                session: 9908,
                rss_pages: 413,
            })
        );
        // A command may name itself anything, up to 15 bytes: here
        // `a) Z 1 (b`, which a parser splitting on spaces or on the first
        // `)` would read as a zombie whose parent is init.
        let tricky = "321 (a) Z 1 (b) S 7 321 321 0 -1 4194560 10 0 0 0 0 0 0 0 20 0 3 0 \
                      1000 2000 55 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let stat = parse_proc_stat(tricky).expect("parsed");
        assert_eq!(
            (
                stat.pid,
                stat.state,
                stat.ppid,
                stat.pgrp,
                stat.session,
                stat.rss_pages
            ),
            (321, b'S', 7, 321, 321, 55)
        );
        assert!(!stat.is_dead());
        let zombie = "99 (sleep) Z 1 99 99 0 -1 4227084 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 \
                      18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert!(parse_proc_stat(zombie).expect("parsed").is_dead());
        assert_eq!(parse_proc_stat("12 (short) S 1 2"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn the_scan_finds_this_process_in_its_own_session() {
        let (pid, pgrp) = own_ids();
        let found = scan_processes(|p| p.pid == pid).expect("scan /proc");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pgrp, pgrp);
        assert!(found[0].rss_pages > 0);
        assert!(page_size_kib() >= 4);
    }

    #[test]
    fn descendants_are_found_through_the_children_lists() {
        let (pid, _) = own_ids();
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("spawn");
        let shell = child.id();
        let mut found = Vec::new();
        for _ in 0..1000 {
            found = descendants(pid, 1000).expect("children lists");
            if found.iter().any(|p| p.ppid == shell) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for grandchild in found.iter().filter(|p| p.ppid == shell) {
            let _ = signal_pid(grandchild.pid, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found.iter().any(|p| p.pid == shell && p.ppid == pid),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.ppid == shell),
            "the grandchild: {found:?}"
        );
        assert!(descendants(4_000_000, 10).is_err());
    }

    #[test]
    fn a_child_in_a_new_session_writes_to_its_pipes_and_is_reaped_by_pid() {
        use std::io::Read;
        let shell = c"/bin/sh";
        let argv = [shell, c"-c", c"echo out; echo err >&2; exit 4"];
        let envp: [&CStr; 0] = [];
        let stdin = std::fs::File::open("/dev/null").expect("/dev/null");
        let (out_read, out_write) = output_pipe().expect("pipe");
        let (err_read, err_write) = output_pipe().expect("pipe");
        let child = spawn_watched(&ExecSpec {
            program: shell,
            argv: &argv,
            envp: &envp,
            stdin: stdin.as_fd(),
            stdout: Some(out_write.as_fd()),
            stderr: Some(err_write.as_fd()),
            new_session: true,
            parent_death_signal: Some(libc::SIGKILL),
        })
        .expect("spawn");
        drop((out_write, err_write));
        let pid = child.pid;
        let status = wait_pid(pid, true).expect("wait").expect("exited");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 4);
        let mut text = String::new();
        let mut out = std::fs::File::from(out_read);
        out.read_to_string(&mut text).expect("read");
        assert_eq!(text, "out\n");
        text.clear();
        let mut err = std::fs::File::from(err_read);
        err.read_to_string(&mut text).expect("read");
        assert_eq!(text, "err\n");
        // Reaped already: no child of that pid any more.
        assert!(reap_pid(pid).is_err());
        assert!(signal_pid(1, libc::SIGTERM).is_err());
        assert!(signal_pid(4_000_000, 0).is_ok());
    }

    #[test]
    fn killing_a_missing_group_is_fine_and_low_groups_are_refused() {
        assert!(kill_process_group(1).is_err());
        assert!(kill_process_group(0).is_err());
        // A pid far above pid_max names no group.
        assert!(kill_process_group(4_000_000).is_ok());
    }
}
