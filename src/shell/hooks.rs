//! Hook processes: `/bin/sh -c CMD` in a process group of its own, reaped without
//! blocking when SIGCHLD says something exited.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::core::{HookContext, HookExit};
use crate::sys;

/// A running hook process.
pub struct HookProcess {
    pub pid: u32,
    child: Child,
}

impl HookProcess {
    /// Starts the hook: stdin from /dev/null, stdout and stderr to our stderr,
    /// client facts only in the environment (never in the command string).
    pub fn spawn(command: &str, context: &HookContext) -> io::Result<HookProcess> {
        let stdout = io::stderr().as_fd().try_clone_to_owned()?;
        let mut process = Command::new("/bin/sh");
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
            child,
        })
    }

    /// The exit, if the process has ended; reaps it so no zombie is left.
    pub fn try_reap(&mut self) -> io::Result<Option<HookExit>> {
        Ok(self.child.try_wait()?.map(exit_of))
    }

    /// SIGKILL to the hook's whole process group.
    pub fn kill(&self) -> io::Result<()> {
        sys::kill_process_group(self.pid)
    }
}

fn exit_of(status: ExitStatus) -> HookExit {
    match (status.code(), status.signal()) {
        (Some(0), _) => HookExit::Success,
        (Some(code), _) => HookExit::Failed(code),
        (None, Some(signal)) => HookExit::Signaled(signal),
        (None, None) => HookExit::Failed(-1),
    }
}
