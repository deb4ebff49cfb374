//! Hooks: the table of those in force, starting them (a closure on the loop
//! thread, or `/bin/sh -c CMD` in a process group of its own), watching their
//! exit and killing them. Hooks of one instance never overlap, hooks of
//! different instances of a pool may run at once: every running hook is in
//! [`Shell::running_hooks`]. Each process is watched through its own pidfd,
//! registered with the poll under the one token [`HOOK_EXIT`] (readable =
//! exited; every running process is then asked); where the kernel has no
//! pidfds, through SIGCHLD. A hook process's stdout and stderr are its
//! instance's pipes, which the loop reads and logs line by line
//! (`event=output from=on-activate instance=I`).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Instant;

use mio::Interest;
use mio::unix::SourceFd;

use signal_hook::consts::signal::SIGCHLD;

use super::output::{Source, Writer};
use super::service::inherited_env;
use super::{HOOK_EXIT, SERVICE_MANAGER_ENV, Shell, watch_signals};
use crate::api::hook::{Hook, HookBody, Reply, Ticket, TimeoutInfo};
use crate::config::{Config, LogLevel};
use crate::core::{
    EndedBy, HookContext, HookExit, HookId, HookKind, HookRef, HookRequest, InstanceId, Outcome,
};
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
    /// stderr to `output` (the loop's pipes), client facts only in the
    /// environment (never in the command string). An error for which
    /// [`sys::is_pidfd_unsupported`] holds means: use
    /// [`HookProcess::spawn_without_pidfd`].
    pub fn spawn(
        command: &str,
        context: &HookContext,
        output: &[OwnedFd; 2],
    ) -> io::Result<HookProcess> {
        let nul_error = || io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the hook");
        let program = CString::new(SHELL).map_err(|_| nul_error())?;
        let args = [
            program.clone(),
            CString::new("-c").map_err(|_| nul_error())?,
            CString::new(command).map_err(|_| nul_error())?,
        ];
        let overrides = hook_env(context);
        let mut env = inherited_env(std::env::vars_os(), |key| {
            overrides.iter().any(|(name, _)| OsStr::new(name) == key)
                || SERVICE_MANAGER_ENV
                    .iter()
                    .any(|name| OsStr::new(name) == key)
        });
        for (key, value) in &overrides {
            env.push(CString::new(format!("{key}={value}")).map_err(|_| nul_error())?);
        }
        let argv: Vec<&CStr> = args.iter().map(CString::as_c_str).collect();
        let envp: Vec<&CStr> = env.iter().map(CString::as_c_str).collect();
        let stdin = File::open("/dev/null")?;
        let child = sys::spawn_watched(&ExecSpec {
            program: &program,
            argv: &argv,
            envp: &envp,
            stdin: stdin.as_fd(),
            stdout: Some(output[0].as_fd()),
            stderr: Some(output[1].as_fd()),
            new_session: false,
            parent_death_signal: None,
        })?;
        Ok(HookProcess {
            pid: child.pid,
            watch: Watch::Pidfd(child),
        })
    }

    /// Starts the hook as [`HookProcess::spawn`] does, for a kernel without
    /// pidfds: its exit is noticed through SIGCHLD.
    pub fn spawn_without_pidfd(
        command: &str,
        context: &HookContext,
        [out_write, err_write]: [OwnedFd; 2],
    ) -> io::Result<HookProcess> {
        let mut process = Command::new(SHELL);
        process
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_write))
            .stderr(Stdio::from(err_write))
            // Its own group, so a hook timeout kills what the hook started too.
            .process_group(0);
        for name in SERVICE_MANAGER_ENV {
            process.env_remove(name);
        }
        for (key, value) in hook_env(context) {
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

/// The `TCPLOCK_*` variables of a command hook, in a fixed order; with
/// `--spawn`, the service's generation and pid last. `TCPLOCK_UPSTREAM`
/// and the counters are those of the instance the hook runs for.
fn hook_env(context: &HookContext) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("TCPLOCK_EVENT", context.kind.as_str().to_string()),
        ("TCPLOCK_CONN_ID", context.conn.to_string()),
        ("TCPLOCK_CLIENT_ADDR", context.client.to_string()),
        ("TCPLOCK_INSTANCE", context.instance.to_string()),
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
    ];
    if let Some((generation, pid)) = context.service {
        env.push(("TCPLOCK_GENERATION", generation.to_string()));
        env.push(("TCPLOCK_UPSTREAM_PID", pid.to_string()));
    }
    env
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

/// A hook the core waits for.
pub(super) struct RunningHook {
    id: HookId,
    kind: HookKind,
    /// The instance it runs for, for its log lines.
    instance: InstanceId,
    started: Instant,
    /// `None` for a closure hook (its ticket is still out).
    process: Option<HookProcess>,
}

impl RunningHook {
    /// Descriptors it holds: its pidfd, if it is watched by one.
    pub(super) fn open_fds(&self) -> usize {
        self.process
            .as_ref()
            .map_or(0, |p| usize::from(p.pidfd().is_some()))
    }
}

/// Descriptors the running hooks hold: their pidfds.
pub(super) fn open_fds(running: &[RunningHook]) -> usize {
    running.iter().map(RunningHook::open_fds).sum()
}

impl Shell {
    /// A hook pidfd turned readable, or SIGCHLD came: every running hook
    /// process that has exited is reaped and reported. At most one per
    /// instance runs, so this is a short walk.
    pub(super) fn reap(&mut self, now: u64) {
        let mut index = 0;
        while let Some(run) = self.running_hooks.get_mut(index) {
            index += 1;
            let Some(process) = &mut run.process else {
                continue;
            };
            let exit = match process.try_reap() {
                Ok(Some(exit)) => exit,
                Ok(None) => continue,
                Err(e) => HookExit::SpawnFailed(format!("wait failed: {e}")),
            };
            let hook = run.id;
            // It leaves the list: the next one moved into its place.
            index -= 1;
            self.hook_ended(now, hook, exit);
        }
    }

    /// The one way a running hook ends, whatever kind it is: it is forgotten,
    /// logged, and reported to the core. An end for a hook that is not
    /// running (a ticket answered after it was abandoned) is ignored.
    pub(super) fn hook_ended(&mut self, now: u64, hook: HookId, exit: HookExit) {
        let Some(index) = self.running_hooks.iter().position(|run| run.id == hook) else {
            return;
        };
        let run = self.running_hooks.remove(index);
        // What it wrote comes before its exit in the log.
        if run.process.is_some() {
            self.output_done(Source::Hook(run.instance));
        }
        if let Some(line) = self.logger.line(LogLevel::Info, "hook_exited") {
            line.field("hook", hook)
                .field_opt("pid", run.process.as_ref().map(|p| p.pid))
                .field("status", &exit)
                .field("duration_ms", run.started.elapsed().as_millis())
                .field("instance", run.instance);
        }
        if let Some(metrics) = &mut self.metrics {
            let ms = u64::try_from(run.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            metrics.recorder.hook_ended(run.kind, &exit, Some(ms));
        }
        self.core.handle_hook_exited(now, hook, exit);
    }

    pub(super) fn spawn_hook(&mut self, now: u64, request: &HookRequest) {
        let context = &request.context;
        // The core asks only for hooks the table named for it.
        let Some(run) = self.hooks.get(request.run).cloned() else {
            let exit = HookExit::SpawnFailed("unknown hook".into());
            self.hook_not_started(context.kind, &exit);
            self.core.handle_hook_exited(now, request.hook, exit);
            return;
        };
        if let HookBody::Command(_) = run.body() {
            self.output_from(
                Source::Hook(context.instance),
                Writer::Hook {
                    hook: request.hook,
                    kind: context.kind,
                    generation: context.service.map(|(generation, _)| generation),
                    instance: context.instance,
                },
            );
        }
        let process = match run.body() {
            HookBody::Command(command) => match self.spawn_process(command, context) {
                Ok(process) => Some(process),
                Err(e) => {
                    // Nothing ran: the core logs the failure and retries.
                    let exit = HookExit::SpawnFailed(e.to_string());
                    self.hook_not_started(context.kind, &exit);
                    self.core.handle_hook_exited(now, request.hook, exit);
                    return;
                }
            },
            HookBody::Activate(_) | HookBody::Timeout(_) => None,
        };
        if let Some(line) = self.logger.line(LogLevel::Info, "hook_started") {
            line.field("hook", request.hook)
                .field("kind", context.kind.as_str())
                .field_opt("pid", process.as_ref().map(|p| p.pid))
                .field("conn", context.conn)
                .field("instance", context.instance);
        }
        self.running_hooks.push(RunningHook {
            id: request.hook,
            kind: context.kind,
            instance: context.instance,
            started: Instant::now(),
            process,
        });
        match run.body() {
            HookBody::Command(_) => {}
            HookBody::Activate(f) => {
                let reply = Reply {
                    control: self.control_tx.clone(),
                    waker: Arc::clone(&self.waker),
                };
                let ticket = Ticket::new(request.hook, context.clone(), reply);
                // A panicking hook drops its ticket on the way out, which
                // answers "failed"; the loop itself carries on.
                if catch_unwind(AssertUnwindSafe(|| f(ticket))).is_err()
                    && let Some(line) = self.logger.line(LogLevel::Error, "hook_panicked")
                {
                    line.field("hook", request.hook);
                }
            }
            HookBody::Timeout(f) => {
                let info = TimeoutInfo::from_context(context);
                let exit = match catch_unwind(AssertUnwindSafe(|| f(&info))) {
                    Ok(()) => HookExit::Success,
                    Err(_) => HookExit::Dropped,
                };
                self.hook_ended(now, request.hook, exit);
            }
        }
    }

    /// A hook run that could not start counts as a run, with no duration.
    fn hook_not_started(&mut self, kind: HookKind, exit: &HookExit) {
        if let Some(metrics) = &mut self.metrics {
            metrics.recorder.hook_ended(kind, exit, None);
        }
    }

    /// Starts a hook process watched by its pidfd, or, on a kernel without
    /// pidfds, by SIGCHLD (said once in the log).
    pub(super) fn spawn_process(
        &mut self,
        command: &str,
        context: &HookContext,
    ) -> io::Result<HookProcess> {
        let output = self.output_writers(Source::Hook(context.instance))?;
        if self.pidfds_available {
            match HookProcess::spawn(command, context, &output) {
                Ok(process) => {
                    let Some(pidfd) = process.pidfd() else {
                        return Ok(process);
                    };
                    let raw = pidfd.as_raw_fd();
                    let watched = self.poll.registry().register(
                        &mut SourceFd(&raw),
                        HOOK_EXIT,
                        Interest::READABLE,
                    );
                    let Err(e) = watched else {
                        return Ok(process);
                    };
                    // Unwatched, it would hold the hook slot forever.
                    let _ = process.kill();
                    let mut process = process;
                    let _ = process.wait();
                    self.pidfd_unwatchable(e)?;
                }
                Err(e) if sys::is_pidfd_unsupported(&e) => self.pidfds_unavailable(e),
                Err(e) => return Err(e),
            }
        }
        self.watch_sigchld()?;
        HookProcess::spawn_without_pidfd(command, context, output)
    }

    /// A child's pidfd could not be registered with the poll (the child is
    /// killed and reaped already). Linux 5.2 hands out pidfds that cannot be
    /// polled yet: then pidfds are given up on and `Ok` means "spawn again,
    /// watched by SIGCHLD"; any other error is the spawn's.
    pub(super) fn pidfd_unwatchable(&mut self, error: io::Error) -> io::Result<()> {
        if error.raw_os_error() != Some(libc::EPERM) {
            return Err(error);
        }
        self.pidfds_unavailable(error);
        Ok(())
    }

    /// From now on hooks are watched through SIGCHLD; said once.
    pub(super) fn pidfds_unavailable(&mut self, error: io::Error) {
        self.pidfds_available = false;
        if let Some(line) = self.logger.line(LogLevel::Warn, "pidfd_unavailable") {
            line.field("error", error).field("fallback", "SIGCHLD");
        }
    }

    pub(super) fn kill_hook(&mut self, now: u64, hook: HookId) {
        let Some(run) = self.running_hooks.iter().find(|run| run.id == hook) else {
            return;
        };
        match &run.process {
            Some(process) => {
                if let Err(e) = process.kill()
                    && let Some(line) = self.logger.line(LogLevel::Error, "hook_kill_failed")
                {
                    line.field("hook", hook)
                        .field("pid", process.pid)
                        .field("error", e);
                }
            }
            // A thread cannot be killed: stop waiting for its answer.
            None => self.hook_ended(now, hook, HookExit::Abandoned),
        }
    }

    /// As PID 1: reaps every exited child that is not a pidfd-watched hook
    /// (those exit without SIGCHLD and are not taken here). A hook started
    /// without a pidfd may be among them: its status goes to the hook.
    pub(super) fn reap_orphans(&mut self, now: u64) {
        if !self.reaps_orphans {
            return;
        }
        while let Some((pid, status)) = sys::reap_any_child() {
            if let Some(instance) = self.service_sigchld_leader(pid) {
                self.service_leader_status(now, instance, status);
                continue;
            }
            let Some(hook) = self
                .running_hooks
                .iter()
                .find(|run| run.process.as_ref().is_some_and(|p| p.pid == pid))
                .map(|run| run.id)
            else {
                continue;
            };
            self.hook_ended(now, hook, exit_of_raw(status));
        }
    }

    /// Whether `pid` is a running hook process (of any instance): its exit
    /// is the hook's to reap, never the zombie reaper's.
    pub(super) fn is_hook_pid(&self, pid: u32) -> bool {
        self.running_hooks
            .iter()
            .any(|run| run.process.as_ref().is_some_and(|p| p.pid == pid))
    }

    /// Whether a hook of `instance` runs.
    pub(super) fn hook_runs_for(&self, instance: InstanceId) -> bool {
        self.running_hooks
            .iter()
            .any(|run| run.instance == instance)
    }

    /// Adds SIGCHLD to the watched signals, installing the handler if none is.
    pub(super) fn watch_sigchld(&mut self) -> io::Result<()> {
        match &self.signals {
            Some(signals) => signals.add_signal(SIGCHLD),
            None => {
                self.signals = Some(watch_signals(&self.poll, &[SIGCHLD])?);
                // Its self-pipe was not open when the budget counted.
                self.fds.opened_for_good(2);
                Ok(())
            }
        }
    }
}
