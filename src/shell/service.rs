//! The supervised upstream (`--spawn`), the shell's side: the table naming
//! the command for the core, the running generation's process (watched by
//! its pidfd), the readiness probe, the four service actions (probe, spawn,
//! sample, signal), reaping the session's orphans, and the output of the
//! service and of hook processes, read through non-blocking pipes and logged
//! line by line. Every decision (when to start, probe, stop, give up) is the
//! core's.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::net::{ConnectResult, connect_result};
use super::relay::SocketEvent;
use super::{
    HOOK_STDERR, HOOK_STDOUT, SERVICE_EXIT, SERVICE_PROBE, SERVICE_STDERR, SERVICE_STDOUT, Shell,
};
use crate::config::units::HostPort;
use crate::config::{Config, LogLevel};
use crate::core::{
    Generation, HookId, HookKind, RestartReason, ServiceExit, ServiceRef, ServiceSample, StopSignal,
};
use crate::sys::{self, ExecSpec, WatchedChild};

/// Longest line of a child's output logged as it is; the rest of a longer
/// line is dropped and the line marked `truncated=true`.
pub(super) const MAX_LINE: usize = 4096;

/// How long a readiness probe may wait for an answer: a black hole (SYNs
/// dropped) answers "not yet" after this, not after the kernel's minutes.
const PROBE_TIMEOUT_MS: u64 = 1_000;

/// Reads of one output pipe per loop turn before the others get their turn;
/// a service that writes without pause is read again next turn.
const READS_PER_TURN: usize = 8;

/// Environment variables never passed to the service: systemd's
/// notification socket, socket activation and watchdog are tcplock's, not
/// its child's (`LISTEN_*` and `WATCHDOG_*` are prefixes).
const SCRUBBED: [&str; 3] = ["NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"];

/// The service command in force, under the name the core knows it by. A
/// reload that changes the command or the upstream address names it anew,
/// so the core can tell a change (restart when drained) from a keep.
#[derive(Default)]
pub(crate) struct ServiceTable {
    current: Option<(ServiceRef, ServiceCommand)>,
    next: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ServiceCommand {
    command: String,
    upstream: HostPort,
}

impl ServiceTable {
    /// Takes the config's service and returns its name, the same as before
    /// when neither the command nor the address changed; `None` without
    /// `--spawn`.
    pub(crate) fn update(&mut self, config: &Config) -> Option<ServiceRef> {
        let Some(command) = &config.spawn else {
            self.current = None;
            return None;
        };
        let wanted = ServiceCommand {
            command: command.clone(),
            upstream: config.upstream.clone(),
        };
        if let Some((name, current)) = &self.current
            && *current == wanted
        {
            return Some(*name);
        }
        self.next += 1;
        let name = ServiceRef(self.next);
        self.current = Some((name, wanted));
        Some(name)
    }

    fn get(&self, name: ServiceRef) -> Option<&ServiceCommand> {
        self.current
            .as_ref()
            .filter(|(n, _)| *n == name)
            .map(|(_, command)| command)
    }
}

/// The service's shell-side state: the last generation spawned, the probe
/// in flight, whether orphans come to us.
#[derive(Default)]
pub(super) struct ServiceIo {
    pub(super) table: ServiceTable,
    running: Option<RunningService>,
    probe: Option<Probe>,
    /// `PR_SET_CHILD_SUBREAPER` is set (it stays set).
    subreaper: bool,
}

/// The last generation spawned. Kept after its leader exits: its pid is
/// the session id its leftovers are found by.
struct RunningService {
    generation: Generation,
    /// The spawned process, leader of the session whose id is this pid.
    pid: u32,
    leader: Leader,
}

enum Leader {
    /// Watched by its pidfd (readable once it exited).
    Pidfd(WatchedChild),
    /// Started without a pidfd: reaped by pid when SIGCHLD comes.
    Sigchld,
    /// Reaped; its exit went to the core.
    Reaped,
}

impl RunningService {
    /// The leader's pid while it is not reaped: nobody else may reap it.
    fn unreaped(&self) -> Option<u32> {
        (!matches!(self.leader, Leader::Reaped)).then_some(self.pid)
    }
}

struct Probe {
    generation: Generation,
    socket: TcpStream,
    /// Core ms after which the probe answers "not answered".
    deadline: u64,
}

/// Whose output a pipe carries, for the `from=` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OutputSource {
    Upstream(Generation),
    Hook {
        hook: HookId,
        kind: HookKind,
        generation: Option<Generation>,
    },
}

/// One output pipe of a child, read without blocking, split into lines.
pub(super) struct OutputPipe {
    file: File,
    source: OutputSource,
    lines: LineSplitter,
}

/// The four output pipes the loop reads, by slot: the service's stdout and
/// stderr, the running hook's stdout and stderr.
#[derive(Default)]
pub(super) struct Outputs {
    pipes: [Option<OutputPipe>; 4],
    /// Some pipe used up its reads for the turn and may hold more.
    pub(super) more: bool,
}

const OUTPUT_TOKENS: [Token; 4] = [SERVICE_STDOUT, SERVICE_STDERR, HOOK_STDOUT, HOOK_STDERR];

/// Slots of [`Outputs`].
pub(super) const SERVICE_OUTPUT: [usize; 2] = [0, 1];
pub(super) const HOOK_OUTPUT: [usize; 2] = [2, 3];

impl Outputs {
    /// The slot a poll token names, if it names an output pipe.
    pub(super) fn slot_of(token: Token) -> Option<usize> {
        OUTPUT_TOKENS.iter().position(|t| *t == token)
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes (without
/// the newline); a longer line is cut there and the rest of it dropped.
#[derive(Default)]
pub(super) struct LineSplitter {
    partial: Vec<u8>,
    /// Dropping the rest of a line that was cut.
    cutting: bool,
}

impl LineSplitter {
    /// Feeds bytes; `emit(line, cut)` gets each line completed by them.
    pub(super) fn feed(&mut self, bytes: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        let mut rest = bytes;
        loop {
            let newline = rest.iter().position(|b| *b == b'\n');
            let segment = &rest[..newline.unwrap_or(rest.len())];
            if !self.cutting {
                let room = MAX_LINE - self.partial.len();
                if segment.len() > room {
                    self.partial.extend_from_slice(&segment[..room]);
                    emit(&self.partial, true);
                    self.partial.clear();
                    self.cutting = true;
                } else {
                    self.partial.extend_from_slice(segment);
                }
            }
            let Some(at) = newline else {
                return;
            };
            if !self.cutting {
                emit(&self.partial, false);
            }
            self.partial.clear();
            self.cutting = false;
            rest = &rest[at + 1..];
        }
    }

    /// End of stream: a last line without a newline is a line too.
    pub(super) fn finish(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.cutting && !self.partial.is_empty() {
            emit(&self.partial, false);
        }
        self.partial = Vec::new();
        self.cutting = false;
    }
}

/// The service's environment: ours without [`SCRUBBED`] and without any
/// variable `ours` sets, then `ours`. An entry holding a NUL (impossible in
/// a real environment) is skipped.
pub(super) fn service_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    ours: &[(&str, String)],
) -> Vec<CString> {
    let mut env = Vec::new();
    for (key, value) in parent {
        let name = key.as_bytes();
        if SCRUBBED.iter().any(|s| {
            let s = s.as_bytes();
            if s.ends_with(b"_") {
                name.starts_with(s)
            } else {
                name == s
            }
        }) || ours.iter().any(|(k, _)| OsStr::new(k) == key)
        {
            continue;
        }
        let mut entry = name.to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        if let Ok(entry) = CString::new(entry) {
            env.push(entry);
        }
    }
    for (key, value) in ours {
        if let Ok(entry) = CString::new(format!("{key}={value}")) {
            env.push(entry);
        }
    }
    env
}

/// A raw wait status as the service's exit.
fn service_exit(status: i32) -> ServiceExit {
    if libc::WIFEXITED(status) {
        ServiceExit::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ServiceExit::Signal(libc::WTERMSIG(status))
    } else {
        ServiceExit::Code(-1)
    }
}

impl Shell {
    /// `--spawn` is configured: orphans of the service come to us (child
    /// subreaper) and their exits are noticed (SIGCHLD). Once.
    pub(super) fn supervise(&mut self) {
        if self.service.subreaper || self.config.spawn.is_none() {
            return;
        }
        self.service.subreaper = true;
        if let Err(e) = sys::set_child_subreaper()
            && let Some(line) = self.logger.line(LogLevel::Warn, "subreaper_failed")
        {
            line.field("error", e);
        }
        if let Err(e) = self.watch_sigchld()
            && let Some(line) = self.logger.line(LogLevel::Warn, "sigchld_unwatched")
        {
            line.field("error", e);
        }
    }

    /// `Action::ProbeUpstream`: a non-blocking connect to the upstream,
    /// answered once: connected, refused, failed or timed out.
    pub(super) fn probe_upstream(&mut self, now: u64, generation: Generation) {
        // One probe at a time: an earlier one still out answers "no" now.
        if let Some(probe) = self.service.probe.take() {
            self.end_probe(now, probe, false);
        }
        let Some(addr) = self.upstream_addrs.first().copied() else {
            self.core.handle_service_probed(now, generation, false);
            return;
        };
        match self.start_probe(addr) {
            Ok(socket) => {
                self.service.probe = Some(Probe {
                    generation,
                    socket,
                    deadline: now.saturating_add(PROBE_TIMEOUT_MS),
                });
            }
            Err(_) => self.core.handle_service_probed(now, generation, false),
        }
    }

    fn start_probe(&mut self, addr: SocketAddr) -> io::Result<TcpStream> {
        let mut socket = TcpStream::connect(addr)?;
        self.poll
            .registry()
            .register(&mut socket, SERVICE_PROBE, Interest::WRITABLE)?;
        Ok(socket)
    }

    /// The probe socket's readiness.
    pub(super) fn probe_ready(&mut self, now: u64, event: SocketEvent) {
        let Some(probe) = &self.service.probe else {
            return;
        };
        let answered = match connect_result(&probe.socket, event) {
            ConnectResult::Pending => return,
            ConnectResult::Connected => true,
            ConnectResult::Failed(_) => false,
        };
        if let Some(probe) = self.service.probe.take() {
            self.end_probe(now, probe, answered);
        }
    }

    /// A probe past its deadline answers "not answered".
    pub(super) fn expire_probe(&mut self, now: u64) {
        if let Some(probe) = self.service.probe.take_if(|probe| probe.deadline <= now) {
            self.end_probe(now, probe, false);
        }
    }

    /// When the probe in flight gives up, for the poll timeout.
    pub(super) fn probe_deadline(&self) -> Option<u64> {
        self.service.probe.as_ref().map(|probe| probe.deadline)
    }

    fn end_probe(&mut self, now: u64, mut probe: Probe, answered: bool) {
        let _ = self.poll.registry().deregister(&mut probe.socket);
        drop(probe.socket);
        self.core
            .handle_service_probed(now, probe.generation, answered);
    }

    /// `Action::SpawnService`: `/bin/sh -c CMD` in a new session, its output
    /// on pipes, answered at once with its pid or why it could not start.
    pub(super) fn spawn_service(
        &mut self,
        now: u64,
        generation: Generation,
        reason: RestartReason,
        run: ServiceRef,
    ) {
        let spawned = self.start_service(generation, reason, run);
        self.core
            .handle_service_spawned(now, generation, spawned.map_err(|e| one_line(&e)));
    }

    fn start_service(
        &mut self,
        generation: Generation,
        reason: RestartReason,
        run: ServiceRef,
    ) -> io::Result<u32> {
        let command = self
            .service
            .table
            .get(run)
            .cloned()
            .ok_or_else(|| io::Error::other("no such service command (changed by a reload)"))?;
        // What is left of an earlier generation's output is read now; its
        // pipes make room for this one's.
        for slot in SERVICE_OUTPUT {
            self.close_output(slot, true);
        }
        let ours = [
            ("TCPLOCK_UPSTREAM_HOST", command.upstream.host.clone()),
            ("TCPLOCK_UPSTREAM_PORT", command.upstream.port.to_string()),
            ("TCPLOCK_GENERATION", generation.to_string()),
            ("TCPLOCK_RESTART_REASON", reason.as_str().to_string()),
        ];
        let env = service_env(std::env::vars_os(), &ours);
        let nul = || io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command");
        let program = c"/bin/sh";
        let script = CString::new(command.command.as_str()).map_err(|_| nul())?;
        let argv = [program, c"-c", script.as_c_str()];
        let envp: Vec<&CStr> = env.iter().map(CString::as_c_str).collect();
        let stdin = File::open("/dev/null")?;
        let (out_read, out_write) = sys::output_pipe()?;
        let (err_read, err_write) = sys::output_pipe()?;
        let spec = ExecSpec {
            program,
            argv: &argv,
            envp: &envp,
            stdin: stdin.as_fd(),
            stdout: Some(out_write.as_fd()),
            stderr: Some(err_write.as_fd()),
            new_session: true,
            parent_death_signal: Some(libc::SIGKILL),
        };
        let (pid, leader) = self.spawn_leader(&spec)?;
        drop((out_write, err_write));
        self.service.running = Some(RunningService {
            generation,
            pid,
            leader,
        });
        let source = OutputSource::Upstream(generation);
        self.open_output(SERVICE_OUTPUT[0], out_read, source);
        self.open_output(SERVICE_OUTPUT[1], err_read, source);
        Ok(pid)
    }

    /// Spawns the leader watched by a pidfd or, on a kernel without pidfds,
    /// by SIGCHLD (said once, as for hooks).
    fn spawn_leader(&mut self, spec: &ExecSpec<'_>) -> io::Result<(u32, Leader)> {
        if self.pidfds_available {
            match sys::spawn_watched(spec) {
                Ok(child) => {
                    let raw = child.pidfd.as_raw_fd();
                    let watched = self.poll.registry().register(
                        &mut SourceFd(&raw),
                        SERVICE_EXIT,
                        Interest::READABLE,
                    );
                    let Err(e) = watched else {
                        return Ok((child.pid, Leader::Pidfd(child)));
                    };
                    // Unwatched, its exit would go unnoticed.
                    let _ = sys::pidfd_signal(child.pidfd.as_fd(), libc::SIGKILL);
                    let _ = sys::wait_exited(&child, true);
                    // Linux 5.2 hands out pidfds that cannot be polled yet.
                    if e.raw_os_error() != Some(libc::EPERM) {
                        return Err(e);
                    }
                    self.pidfds_unavailable(e);
                }
                Err(e) if sys::is_pidfd_unsupported(&e) => self.pidfds_unavailable(e),
                Err(e) => return Err(e),
            }
        }
        self.watch_sigchld()?;
        Ok((sys::spawn_unwatched(spec)?, Leader::Sigchld))
    }

    /// The leader's pidfd turned readable, or SIGCHLD came: if the leader
    /// exited, it is reaped and the core told.
    pub(super) fn service_exited(&mut self, now: u64) {
        let Some(running) = &mut self.service.running else {
            return;
        };
        // `Err`: reaped behind our back (a host ignoring SIGCHLD); the pidfd
        // may still know how it ended, else the exit reads as code -1.
        let status = match &running.leader {
            Leader::Pidfd(child) => match sys::wait_exited(child, false) {
                Ok(status) => status.map(service_exit),
                Err(_) => Some(
                    sys::pidfd_exit_status(child.pidfd.as_fd())
                        .map_or(ServiceExit::Code(-1), service_exit),
                ),
            },
            Leader::Sigchld => match sys::reap_pid(running.pid) {
                Ok(status) => status.map(service_exit),
                Err(_) => Some(ServiceExit::Code(-1)),
            },
            Leader::Reaped => None,
        };
        let Some(exit) = status else {
            return;
        };
        self.leader_reaped(now, exit);
    }

    /// The leader is reaped: forgotten as a child, its exit reported. Its
    /// session's other processes remain the core's business.
    fn leader_reaped(&mut self, now: u64, exit: ServiceExit) {
        let Some(running) = &mut self.service.running else {
            return;
        };
        if let Leader::Pidfd(child) = &running.leader {
            let raw = child.pidfd.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        running.leader = Leader::Reaped;
        let generation = running.generation;
        self.core.handle_service_exited(now, generation, exit);
    }

    /// The service leader's pid, if it is a SIGCHLD child not yet reaped
    /// (for PID 1's reaping of every child).
    pub(super) fn service_sigchld_leader(&self) -> Option<u32> {
        self.service
            .running
            .as_ref()
            .filter(|running| matches!(running.leader, Leader::Sigchld))
            .map(|running| running.pid)
    }

    /// PID 1 reaped the SIGCHLD-watched leader: its status is the service's.
    pub(super) fn service_leader_status(&mut self, now: u64, status: i32) {
        self.leader_reaped(now, service_exit(status));
    }

    /// `Action::SampleService`: the live processes of the generation's
    /// session and their summed RSS; exited children of it are reaped.
    pub(super) fn sample_service(&mut self, now: u64, generation: Generation) {
        let sample = match self.session_of(generation) {
            Some(session) => {
                let members = self.session_members(session);
                self.reap_zombies(&members);
                let live = members.iter().filter(|p| !p.is_dead());
                let page_kib = sys::page_size_kib();
                ServiceSample {
                    processes: live.clone().count(),
                    rss_kib: live.map(|p| p.rss_pages.saturating_mul(page_kib)).sum(),
                }
            }
            None => ServiceSample::default(),
        };
        self.core.handle_service_sampled(now, generation, sample);
    }

    /// `Action::SignalService`: the signal to every live process of the
    /// generation's session, and to its first process group.
    pub(super) fn signal_service(&mut self, generation: Generation, signal: StopSignal) {
        let Some(session) = self.session_of(generation) else {
            return;
        };
        let signal = match signal {
            StopSignal::Term => libc::SIGTERM,
            StopSignal::Kill => libc::SIGKILL,
        };
        let members = self.session_members(session);
        let live: Vec<u32> = members
            .iter()
            .filter(|p| !p.is_dead())
            .map(|p| p.pid)
            .collect();
        if live.is_empty() {
            // Nothing left pins the session id: it may name a stranger now.
            return;
        }
        // The group the session started with catches a process forked after
        // the scan; then each member, whatever group it moved to.
        let _ = sys::signal_process_group(session, signal);
        for pid in live {
            if let Err(e) = sys::signal_pid(pid, signal)
                && let Some(line) = self.logger.line(LogLevel::Warn, "signal_failed")
            {
                line.field("gen", generation)
                    .field("pid", pid)
                    .field("error", e);
            }
        }
    }

    /// The session id of `generation`, if it is the last one spawned.
    fn session_of(&self, generation: Generation) -> Option<u32> {
        self.service
            .running
            .as_ref()
            .filter(|running| running.generation == generation)
            .map(|running| running.pid)
    }

    fn session_members(&mut self, session: u32) -> Vec<sys::ProcStat> {
        match sys::scan_processes(|p| p.session == session) {
            Ok(members) => members,
            Err(e) => {
                if let Some(line) = self.logger.line(LogLevel::Warn, "proc_scan_failed") {
                    line.field("error", e);
                }
                Vec::new()
            }
        }
    }

    /// SIGCHLD: an orphan handed to us as subreaper (or a child of ours
    /// that is not pidfd-watched) exited. Reaps every exited child of ours
    /// outside our own process group that nobody else waits for; a host's
    /// own children (in our group) are left to the host.
    pub(super) fn reap_service_orphans(&mut self) {
        if !self.service.subreaper {
            return;
        }
        let (own_pid, own_group) = sys::own_ids();
        let zombies =
            sys::scan_processes(|p| p.is_dead() && p.ppid == own_pid && p.pgrp != own_group);
        if let Ok(zombies) = zombies {
            self.reap_zombies(&zombies);
        }
    }

    /// Reaps those of `processes` that are exited children of ours and not
    /// waited for elsewhere (the service leader, the running hook).
    fn reap_zombies(&mut self, processes: &[sys::ProcStat]) {
        let (own_pid, _) = sys::own_ids();
        let leader = self
            .service
            .running
            .as_ref()
            .and_then(RunningService::unreaped);
        let hook = self.hook_pid();
        for process in processes {
            if !process.is_dead()
                || process.ppid != own_pid
                || Some(process.pid) == leader
                || Some(process.pid) == hook
            {
                continue;
            }
            if let Ok(Some(_)) = sys::reap_pid(process.pid)
                && let Some(line) = self.logger.line(LogLevel::Debug, "reaped")
            {
                line.field("pid", process.pid)
                    .field("session", process.session);
            }
        }
    }

    /// Starts reading a child's output pipe in `slot`. A pipe the poll
    /// refuses is dropped: the child's writes then fail, it is not stalled.
    pub(super) fn open_output(&mut self, slot: usize, read: OwnedFd, source: OutputSource) {
        self.close_output(slot, true);
        let raw = read.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&raw),
            OUTPUT_TOKENS[slot],
            Interest::READABLE,
        ) {
            if let Some(line) = self.logger.line(LogLevel::Warn, "output_unwatched") {
                line.field("error", e);
            }
            return;
        }
        self.outputs.pipes[slot] = Some(OutputPipe {
            file: File::from(read),
            source,
            lines: LineSplitter::default(),
        });
        // Whatever is already in it would raise no new edge.
        self.outputs.more = true;
    }

    /// Reads what is there, then stops watching the pipe (`drain_first`:
    /// a last read of what the child left in it, bounded).
    pub(super) fn close_output(&mut self, slot: usize, drain_first: bool) {
        if drain_first && self.outputs.pipes[slot].is_some() {
            for _ in 0..8 {
                if !self.read_output(slot) {
                    break;
                }
            }
        }
        if let Some(mut pipe) = self.outputs.pipes[slot].take() {
            let raw = pipe.file.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            let source = pipe.source;
            let logger = &mut self.logger;
            pipe.lines
                .finish(&mut |line, cut| log_output(logger, source, line, cut));
        }
    }

    /// Reads every output pipe that may hold bytes (all of them after a
    /// turn that left some unread).
    pub(super) fn read_outputs(&mut self) {
        self.outputs.more = false;
        for slot in 0..self.outputs.pipes.len() {
            if self.read_output(slot) {
                self.outputs.more = true;
            }
        }
    }

    /// The pipe in `slot` is readable: reads up to [`READS_PER_TURN`]
    /// times, logging each line. Returns whether more may be waiting. At
    /// end of stream (every writer gone) the pipe is closed.
    pub(super) fn read_output(&mut self, slot: usize) -> bool {
        let mut buf = [0u8; 8192];
        for _ in 0..READS_PER_TURN {
            let Some(pipe) = &mut self.outputs.pipes[slot] else {
                return false;
            };
            match pipe.file.read(&mut buf) {
                Ok(0) => {
                    self.close_output(slot, false);
                    return false;
                }
                Ok(n) => {
                    let source = pipe.source;
                    let logger = &mut self.logger;
                    pipe.lines.feed(&buf[..n], &mut |line, cut| {
                        log_output(logger, source, line, cut)
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if let Some(line) = self.logger.line(LogLevel::Warn, "output_failed") {
                        line.field("error", e);
                    }
                    self.close_output(slot, false);
                    return false;
                }
            }
        }
        true
    }

    /// How long the poll may sleep before the shell's own service deadline
    /// (the probe's), given `timeout` from the core.
    pub(super) fn service_timeout(&self, now: u64, timeout: Option<Duration>) -> Option<Duration> {
        if self.outputs.more {
            return Some(Duration::ZERO);
        }
        match self.probe_deadline() {
            Some(deadline) => {
                let probe = Duration::from_millis(deadline.saturating_sub(now).saturating_add(1));
                Some(timeout.map_or(probe, |t| t.min(probe)))
            }
            None => timeout,
        }
    }
}

/// `level=info event=output from=upstream|on-activate|on-timeout gen=N
/// line="..."`, and `truncated=true` for a line cut at [`MAX_LINE`].
fn log_output(logger: &mut super::Logger, source: OutputSource, bytes: &[u8], cut: bool) {
    let Some(line) = logger.line(LogLevel::Info, "output") else {
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    let line = match source {
        OutputSource::Upstream(generation) => {
            line.field("from", "upstream").field("gen", generation)
        }
        OutputSource::Hook {
            hook,
            kind,
            generation,
        } => line
            .field(
                "from",
                match kind {
                    HookKind::Activate => "on-activate",
                    HookKind::Timeout => "on-timeout",
                },
            )
            .field_opt("gen", generation)
            .field("hook", hook),
    };
    let line = line.field("line", text);
    if cut {
        line.field("truncated", true);
    }
}

/// An error as one line, for `upstream_start_failed why=`.
fn one_line(error: &io::Error) -> String {
    error.to_string().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut lines = Vec::new();
        let mut splitter = LineSplitter::default();
        let mut emit = |line: &[u8], cut: bool| {
            lines.push((String::from_utf8_lossy(line).into_owned(), cut));
        };
        for chunk in chunks {
            splitter.feed(chunk, &mut emit);
        }
        splitter.finish(&mut emit);
        lines
    }

    #[test]
    fn lines_are_split_across_reads_and_a_last_partial_line_counts() {
        let lines = split(&[b"one\ntw", b"o\n\nthr", b"ee"]);
        let want: Vec<(String, bool)> = ["one", "two", "", "three"]
            .iter()
            .map(|s| (s.to_string(), false))
            .collect();
        assert_eq!(lines, want);
    }

    #[test]
    fn a_line_longer_than_the_cap_is_cut_once_and_the_rest_dropped() {
        let long = vec![b'x'; MAX_LINE * 3 + 17];
        let exact = vec![b'y'; MAX_LINE];
        // The long line arrives in odd pieces, the exact one whole.
        let mut chunks: Vec<&[u8]> = long.chunks(1000).collect();
        chunks.push(b"\n");
        chunks.push(&exact);
        chunks.push(b"\nafter\n");
        let lines = split(&chunks);
        assert_eq!(
            lines.len(),
            3,
            "{:?}",
            lines.iter().map(|l| l.0.len()).collect::<Vec<_>>()
        );
        assert_eq!(lines[0], ("x".repeat(MAX_LINE), true));
        assert_eq!(lines[1], ("y".repeat(MAX_LINE), false));
        assert_eq!(lines[2], ("after".to_string(), false));
    }

    #[test]
    fn a_cut_line_ending_exactly_at_a_read_boundary_does_not_leak_into_the_next() {
        let mut over = vec![b'z'; MAX_LINE + 1];
        over.push(b'\n');
        let lines = split(&[&over, b"next"]);
        assert_eq!(
            lines,
            vec![("z".repeat(MAX_LINE), true), ("next".to_string(), false)]
        );
    }

    #[test]
    fn the_service_env_drops_systemd_variables_and_sets_ours() {
        let parent = [
            ("PATH", "/usr/bin"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "42"),
            ("LISTEN_FDNAMES", "x"),
            ("WATCHDOG_USEC", "100"),
            ("WATCHDOG_PID", "42"),
            ("NOTIFY_SOCKETS", "kept: not the same name"),
            ("MY_LISTEN_FDS", "kept: not a prefix match"),
            ("TCPLOCK_GENERATION", "stale"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let ours = [
            ("TCPLOCK_GENERATION", "3".to_string()),
            ("TCPLOCK_RESTART_REASON", "crash".to_string()),
        ];
        let env: Vec<String> = service_env(parent, &ours)
            .into_iter()
            .map(|c| c.into_string().expect("utf-8"))
            .collect();
        assert_eq!(
            env,
            [
                "PATH=/usr/bin",
                "NOTIFY_SOCKETS=kept: not the same name",
                "MY_LISTEN_FDS=kept: not a prefix match",
                "TCPLOCK_GENERATION=3",
                "TCPLOCK_RESTART_REASON=crash",
            ]
        );
    }

    #[test]
    fn wait_statuses_read_as_codes_or_signals() {
        assert_eq!(service_exit(3 << 8), ServiceExit::Code(3));
        assert_eq!(
            service_exit(libc::SIGKILL),
            ServiceExit::Signal(libc::SIGKILL)
        );
    }
}
