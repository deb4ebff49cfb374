//! Hook processes: `/bin/sh -c CMD` in a process group of its own. Each is
//! watched through its own pidfd, registered with the poll (readable = exited);
//! where the kernel has no pidfds, through SIGCHLD as before.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::core::{HookContext, HookExit};
use crate::sys::{self, ExecSpec, WatchedChild};

const SHELL: &str = "/bin/sh";

/// A running hook process.
pub struct HookProcess {
    pub pid: u32,
    watch: Watch,
}

enum Watch {
    Pidfd(WatchedChild),
    /// Spawned by std and reaped when SIGCHLD says something exited.
    Sigchld(Child),
}

impl HookProcess {
    /// Starts the hook watched by a pidfd: stdin from /dev/null, stdout and
    /// stderr to our stderr, client facts only in the environment (never in
    /// the command string). An error for which [`sys::is_pidfd_unsupported`]
    /// holds means: use [`HookProcess::spawn_without_pidfd`].
    pub fn spawn(command: &str, context: &HookContext) -> io::Result<HookProcess> {
        let nul_error = || io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the hook");
        let program = CString::new(SHELL).map_err(|_| nul_error())?;
        let args = [
            program.clone(),
            CString::new("-c").map_err(|_| nul_error())?,
            CString::new(command).map_err(|_| nul_error())?,
        ];
        let overrides = context.env();
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if overrides.iter().any(|(name, _)| OsStr::new(name) == key) {
                continue;
            }
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            // The environment cannot hold a NUL; skip rather than fail.
            if let Ok(entry) = CString::new(entry) {
                env.push(entry);
            }
        }
        for (key, value) in &overrides {
            env.push(CString::new(format!("{key}={value}")).map_err(|_| nul_error())?);
        }
        let argv: Vec<*const libc::c_char> = args
            .iter()
            .map(|arg| arg.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp: Vec<*const libc::c_char> = env
            .iter()
            .map(|entry| entry.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let stdin = File::open("/dev/null")?;
        let child = sys::spawn_watched(&ExecSpec {
            program: &program,
            argv: &argv,
            envp: &envp,
            stdin: stdin.as_fd(),
        })?;
        Ok(HookProcess {
            pid: child.pid,
            watch: Watch::Pidfd(child),
        })
    }

    /// Starts the hook as [`HookProcess::spawn`] does, for a kernel without
    /// pidfds: its exit is noticed through SIGCHLD.
    pub fn spawn_without_pidfd(command: &str, context: &HookContext) -> io::Result<HookProcess> {
        let stdout = io::stderr().as_fd().try_clone_to_owned()?;
        let mut process = Command::new(SHELL);
        process
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::inherit())
            // Its own group, so a hook timeout kills what the hook started too.
            .process_group(0);
        for (key, value) in context.env() {
            process.env(key, value);
        }
        let child = process.spawn()?;
        Ok(HookProcess {
            pid: child.id(),
            watch: Watch::Sigchld(child),
        })
    }

    /// The descriptor that turns readable when the hook exits, if it has one.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        match &self.watch {
            Watch::Pidfd(child) => Some(child.pidfd.as_fd()),
            Watch::Sigchld(_) => None,
        }
    }

    /// The exit, if the process has ended; reaps it so no zombie is left.
    pub fn try_reap(&mut self) -> io::Result<Option<HookExit>> {
        match &mut self.watch {
            Watch::Pidfd(child) => match sys::wait_exited(child, false) {
                Ok(status) => Ok(status.map(exit_of_raw)),
                // Reaped behind our back: the host ignores SIGCHLD, so the
                // kernel reaped it; the pidfd may still know how it ended.
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    match sys::pidfd_exit_status(child.pidfd.as_fd()) {
                        Some(status) => Ok(Some(exit_of_raw(status))),
                        None => Err(io::Error::new(
                            io::ErrorKind::NotFound,
                            "exit status lost: reaped by someone else",
                        )),
                    }
                }
                Err(e) => Err(e),
            },
            Watch::Sigchld(child) => Ok(child.try_wait()?.map(exit_of)),
        }
    }

    /// Waits for the process to end (after [`HookProcess::kill`], at once).
    pub fn wait(&mut self) -> io::Result<HookExit> {
        match &mut self.watch {
            Watch::Pidfd(child) => {
                Ok(sys::wait_exited(child, true)?.map_or(HookExit::Failed(-1), exit_of_raw))
            }
            Watch::Sigchld(child) => Ok(exit_of(child.wait()?)),
        }
    }

    /// SIGKILL to the hook's whole process group. The group id is the
    /// leader's pid, which cannot be reused while the leader is alive or an
    /// unreaped zombie; the pidfd says which, so a leader already reaped
    /// behind our back (a host ignoring SIGCHLD) never leads to a stranger's
    /// group being killed.
    pub fn kill(&self) -> io::Result<()> {
        match &self.watch {
            Watch::Pidfd(child) => {
                if !sys::pidfd_signal(child.pidfd.as_fd(), 0)? {
                    return Ok(());
                }
                let group = sys::kill_process_group(self.pid);
                // The leader is hit even if the group call was refused.
                sys::pidfd_signal(child.pidfd.as_fd(), libc::SIGKILL)?;
                group
            }
            Watch::Sigchld(_) => sys::kill_process_group(self.pid),
        }
    }
}

/// A raw wait status as a hook's exit.
pub fn exit_of_raw(status: i32) -> HookExit {
    exit_of(ExitStatus::from_raw(status))
}

fn exit_of(status: ExitStatus) -> HookExit {
    match (status.code(), status.signal()) {
        (Some(0), _) => HookExit::Success,
        (Some(code), _) => HookExit::Failed(code),
        (None, Some(signal)) => HookExit::Signaled(signal),
        (None, None) => HookExit::Failed(-1),
    }
}
