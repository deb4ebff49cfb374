//! Hook processes: `/bin/sh -c CMD` in a process group of its own, reaped without
//! blocking when SIGCHLD says something exited.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::api::hook::Hook;
use crate::config::Config;
use crate::core::{EndedBy, HookContext, HookExit, HookRef, Outcome};
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
        for (key, value) in hook_env(context) {
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

/// The `TCPLOCK_*` variables of a command hook, in a fixed order.
fn hook_env(context: &HookContext) -> [(&'static str, String); 11] {
    [
        ("TCPLOCK_EVENT", context.kind.as_str().to_string()),
        ("TCPLOCK_CONN_ID", context.conn.to_string()),
        ("TCPLOCK_CLIENT_ADDR", context.client.to_string()),
        ("TCPLOCK_UPSTREAM", context.upstream.clone()),
        ("TCPLOCK_ACTIVATIONS", context.activations.to_string()),
        ("TCPLOCK_TIMEOUTS", context.timeouts.to_string()),
        (
            "TCPLOCK_LAST_OUTCOME",
            context
                .last_outcome
                .map_or("none", Outcome::as_str)
                .to_string(),
        ),
        (
            "TCPLOCK_LAST_ENDED_BY",
            context
                .last_ended_by
                .map_or("none", EndedBy::as_str)
                .to_string(),
        ),
        ("TCPLOCK_QUEUE_LENGTH", context.queue_length.to_string()),
        ("TCPLOCK_ACTIVE", context.active.to_string()),
        ("TCPLOCK_ATTEMPT", context.attempt.to_string()),
    ]
}

/// The hooks in force, under the names the core knows them by. A reload that
/// changes a hook names it anew, so the core can tell a swap from a keep.
#[derive(Default)]
pub(crate) struct HookTable {
    on_activate: Option<(HookRef, Hook)>,
    on_timeout: Option<(HookRef, Hook)>,
    next: u32,
}

impl HookTable {
    /// Takes the config's hooks and returns their names, the same as before
    /// for a hook that did not change.
    pub(crate) fn update(&mut self, config: &Config) -> (Option<HookRef>, Option<HookRef>) {
        let activate = self.name(config.on_activate.as_ref(), |table| &mut table.on_activate);
        let timeout = self.name(config.on_timeout.as_ref(), |table| &mut table.on_timeout);
        (activate, timeout)
    }

    fn name(
        &mut self,
        hook: Option<&Hook>,
        slot: fn(&mut HookTable) -> &mut Option<(HookRef, Hook)>,
    ) -> Option<HookRef> {
        let Some(hook) = hook else {
            *slot(self) = None;
            return None;
        };
        if let Some((name, current)) = slot(self)
            && current == hook
        {
            return Some(*name);
        }
        self.next += 1;
        let name = HookRef(self.next);
        *slot(self) = Some((name, hook.clone()));
        Some(name)
    }

    /// The hook the core asks to run.
    pub(crate) fn get(&self, name: HookRef) -> Option<&Hook> {
        [&self.on_activate, &self.on_timeout]
            .into_iter()
            .flatten()
            .find(|(n, _)| *n == name)
            .map(|(_, hook)| hook)
    }
}
