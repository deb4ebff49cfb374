//! The supervised upstream (`--spawn`), the shell's side: the table naming
//! the command for the core, each instance's running generation (its
//! process watched by its pidfd), its readiness probe, the four service
//! actions (probe, spawn, sample, signal) and reaping the sessions'
//! orphans. Each instance's output goes through its own pipes of
//! [`super::output`]. Every decision (when to start, probe, stop, give up)
//! is the core's.
//!
//! Poll tokens: every instance has a block of [`TOKENS_PER_INSTANCE`]
//! tokens from [`FIRST_SERVICE_TOKEN`] on (its pidfd, its stdout, its
//! stderr, its probe), so an event finds its instance by arithmetic. The
//! block sits at the top of the token space, far above any connection's,
//! because the core may number instances past the configured count (a
//! reload's added instances take new numbers while removed ones drain).

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::Shell;
use super::net::{ConnectResult, connect_result};
use super::output::{PipeId, Source, Writer};
use super::relay::SocketEvent;
use crate::config::units::{HostPort, parse_host_port};
use crate::config::{Config, LogLevel};
use crate::core::{
    Generation, InstanceId, RestartReason, ServiceExit, ServiceRef, ServiceSample, StopSignal,
};
use crate::sys::{self, ExecSpec, WatchedChild};

/// How long a readiness probe may wait for an answer: a black hole (SYNs
/// dropped) answers "not yet" after this, not after the kernel's minutes.
const PROBE_TIMEOUT_MS: u64 = 1_000;

/// Most of our descendants looked at when measuring the service.
const MAX_TREE: usize = 65_536;

/// Environment variables never passed to the service: systemd's
/// notification socket, socket activation and watchdog are tcplock's, not
/// its child's (`LISTEN_*` and `WATCHDOG_*` are prefixes).
const SCRUBBED: [&str; 3] = ["NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"];

/// The first token of instance 1's block; instance `I`'s block starts
/// [`TOKENS_PER_INSTANCE`] × (I - 1) above it. A quarter of the token
/// space from the top: connection tokens (two per slab slot) never get
/// there, and 2^30 instance numbers fit above it even with 32-bit tokens.
pub(super) const FIRST_SERVICE_TOKEN: usize = 1 << (usize::BITS - 2);

/// Tokens per instance, one per [`TokenKind`].
pub(super) const TOKENS_PER_INSTANCE: usize = 6;

/// What a token of an instance's block names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TokenKind {
    /// The service leader's pidfd, readable once it exited.
    Exit = 0,
    Stdout = 1,
    Stderr = 2,
    /// The readiness probe's socket.
    Probe = 3,
    /// The instance's hooks' stdout and stderr pipes.
    HookStdout = 4,
    HookStderr = 5,
}

/// The token of `kind` in `instance`'s block; `None` past the token space.
pub(super) fn token(instance: InstanceId, kind: TokenKind) -> Option<Token> {
    instance
        .index()
        .checked_mul(TOKENS_PER_INSTANCE)?
        .checked_add(kind as usize)?
        .checked_add(FIRST_SERVICE_TOKEN)
        .map(Token)
}

/// The instance and kind a token of the service range names.
pub(super) fn token_owner(token: usize) -> Option<(InstanceId, TokenKind)> {
    let offset = token.checked_sub(FIRST_SERVICE_TOKEN)?;
    let kind = match offset % TOKENS_PER_INSTANCE {
        0 => TokenKind::Exit,
        1 => TokenKind::Stdout,
        2 => TokenKind::Stderr,
        3 => TokenKind::Probe,
        4 => TokenKind::HookStdout,
        _ => TokenKind::HookStderr,
    };
    let index = offset / TOKENS_PER_INSTANCE;
    u32::try_from(index).ok()?;
    Some((InstanceId::at(index), kind))
}

/// The service command in force, under the name the core knows it by. A
/// reload that changes the command names it anew, so the core can tell a
/// change (restart when drained) from a keep. An instance's address is its
/// own (a changed address is a removed instance and an added one).
#[derive(Default)]
pub(crate) struct ServiceTable {
    current: Option<(ServiceRef, String)>,
    next: u32,
}

impl ServiceTable {
    /// Takes the config's service and returns its name, the same as before
    /// when the command did not change; `None` without `--spawn`.
    pub(crate) fn update(&mut self, config: &Config) -> Option<ServiceRef> {
        let Some(command) = &config.spawn else {
            self.current = None;
            return None;
        };
        if let Some((name, current)) = &self.current
            && current == command
        {
            return Some(*name);
        }
        self.next += 1;
        let name = ServiceRef(self.next);
        self.current = Some((name, command.clone()));
        Some(name)
    }

    fn get(&self, name: ServiceRef) -> Option<&str> {
        self.current
            .as_ref()
            .filter(|(n, _)| *n == name)
            .map(|(_, command)| command.as_str())
    }
}

/// The services' shell-side state, per instance; whether orphans come to us.
#[derive(Default)]
pub(super) struct ServiceIo {
    pub(super) table: ServiceTable,
    /// By instance number - 1. An instance's entry outlives its removal by
    /// a reload until its session is gone (it is never dropped, only
    /// emptied: the core may give its number to an added instance).
    instances: Vec<InstanceService>,
    /// Probes in flight, so a turn without any looks at no instance.
    probes: usize,
    /// Set up for supervising: SIGCHLD watched, subreaper asked for.
    supervised: bool,
    /// `PR_SET_CHILD_SUBREAPER` is in force (until a library's lock stops).
    subreaper: bool,
}

/// One instance's service, as the shell sees it.
#[derive(Default)]
struct InstanceService {
    running: Option<RunningService>,
    probe: Option<Probe>,
}

impl ServiceIo {
    fn get(&self, instance: InstanceId) -> Option<&InstanceService> {
        self.instances.get(instance.index())
    }

    fn get_mut(&mut self, instance: InstanceId) -> &mut InstanceService {
        let i = instance.index();
        if self.instances.len() <= i {
            self.instances.resize_with(i + 1, InstanceService::default);
        }
        &mut self.instances[i]
    }

    /// The instances whose leader has not been reaped, and its pid.
    fn unreaped_leaders(&self) -> impl Iterator<Item = (InstanceId, u32)> + '_ {
        self.instances.iter().enumerate().filter_map(|(i, inst)| {
            let pid = inst.running.as_ref()?.unreaped()?;
            Some((InstanceId::at(i), pid))
        })
    }
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
    /// The upstream's addresses as they were when the probe began, and the
    /// one tried after this (`localhost` may name ::1 before 127.0.0.1, and
    /// the service may listen on either).
    addrs: Arc<[SocketAddr]>,
    next_addr: usize,
    /// The loop turn the socket was made in: that turn's events belong to
    /// an earlier probe's socket.
    since_turn: u64,
    /// Core ms after which the probe answers "not answered".
    deadline: u64,
}

/// The service's environment: ours without [`SCRUBBED`] and without any
/// variable `ours` sets, then `ours`. An entry holding a NUL (impossible in
/// a real environment) is skipped.
pub(super) fn service_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    ours: &[(&str, String)],
) -> Vec<CString> {
    let mut env = inherited_env(parent, |key| {
        let name = key.as_bytes();
        SCRUBBED.iter().any(|s| {
            let s = s.as_bytes();
            if s.ends_with(b"_") {
                name.starts_with(s)
            } else {
                name == s
            }
        }) || ours.iter().any(|(k, _)| OsStr::new(k) == key)
    });
    for (key, value) in ours {
        if let Ok(entry) = CString::new(format!("{key}={value}")) {
            env.push(entry);
        }
    }
    env
}

/// `KEY=VALUE` entries of `parent` for a child's environment, without
/// those `skip` names; an entry holding a NUL (impossible in a real
/// environment) is skipped rather than failing the spawn.
pub(super) fn inherited_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    skip: impl Fn(&OsStr) -> bool,
) -> Vec<CString> {
    let mut env = Vec::new();
    for (key, value) in parent {
        if skip(&key) {
            continue;
        }
        let mut entry = key.into_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        if let Ok(entry) = CString::new(entry) {
            env.push(entry);
        }
    }
    env
}

/// Starts what `spec` describes with std's spawn (which does not use
/// clone(CLONE_PIDFD)): the child exits with SIGCHLD and is reaped by pid.
fn spawn_with_std(spec: &ExecSpec<'_>) -> io::Result<u32> {
    let text = |s: &CStr| OsStr::from_bytes(s.to_bytes()).to_os_string();
    let mut command = Command::new(text(spec.program));
    command.args(spec.argv.iter().skip(1).map(|arg| text(arg)));
    command.env_clear();
    for entry in spec.envp {
        let entry = entry.to_bytes();
        if let Some(at) = entry.iter().position(|b| *b == b'=') {
            command.env(
                OsStr::from_bytes(&entry[..at]),
                OsStr::from_bytes(&entry[at + 1..]),
            );
        }
    }
    let owned = |fd: Option<BorrowedFd<'_>>| -> io::Result<Stdio> {
        Ok(match fd {
            Some(fd) => Stdio::from(fd.try_clone_to_owned()?),
            None => Stdio::from(io::stderr().as_fd().try_clone_to_owned()?),
        })
    };
    command
        .stdin(owned(Some(spec.stdin))?)
        .stdout(owned(spec.stdout)?)
        .stderr(owned(spec.stderr)?);
    if spec.new_session {
        sys::in_new_session(&mut command, spec.parent_death_signal.unwrap_or(0));
    }
    Ok(command.spawn()?.id())
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
        if self.service.supervised || self.config.spawn.is_none() {
            return;
        }
        self.service.supervised = true;
        match sys::set_child_subreaper(true) {
            Ok(()) => self.service.subreaper = true,
            Err(e) => {
                if let Some(line) = self.logger.line(LogLevel::Warn, "subreaper_failed") {
                    line.field("error", e);
                }
            }
        }
        if let Err(e) = self.watch_sigchld()
            && let Some(line) = self.logger.line(LogLevel::Warn, "sigchld_unwatched")
        {
            line.field("error", e);
        }
    }

    /// An event on a token of the service range.
    pub(super) fn service_event(&mut self, now: u64, token: usize, event: SocketEvent) {
        let Some((instance, kind)) = token_owner(token) else {
            return;
        };
        match kind {
            TokenKind::Exit => self.service_exited(now, instance),
            TokenKind::Probe => self.probe_ready(now, instance, event),
            TokenKind::Stdout => self.output_ready(PipeId(Source::Service(instance), 0)),
            TokenKind::Stderr => self.output_ready(PipeId(Source::Service(instance), 1)),
            TokenKind::HookStdout => self.output_ready(PipeId(Source::Hook(instance), 0)),
            TokenKind::HookStderr => self.output_ready(PipeId(Source::Hook(instance), 1)),
        }
    }

    /// Where `instance` listens, as configured: its name is the core's (a
    /// reload may give a removed instance's number to an added one).
    fn instance_upstream(&self, instance: InstanceId) -> io::Result<HostPort> {
        let name = self
            .core
            .instance_name(instance)
            .ok_or_else(|| io::Error::other(format!("no instance {instance}")))?;
        parse_host_port(name).map_err(|e| io::Error::other(format!("instance {instance}: {e}")))
    }

    /// `Action::ProbeUpstream`: a non-blocking connect to the instance's
    /// address, answered once: connected, refused, failed or timed out.
    pub(super) fn probe_upstream(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
    ) {
        // One probe at a time per instance: an earlier one still out
        // answers "no" now.
        if let Some(probe) = self.service.get_mut(instance).probe.take() {
            self.service.probes -= 1;
            self.end_probe(now, instance, probe, false);
        }
        // Each number's addresses follow its name (see `Upstreams`).
        let addrs = self
            .upstreams
            .addrs(instance)
            .unwrap_or_else(|| Arc::from([]));
        self.probe_from(
            now,
            instance,
            generation,
            addrs,
            0,
            now.saturating_add(PROBE_TIMEOUT_MS),
        );
    }

    /// Tries the addresses from `first` on until a connect is under way;
    /// with none left, the answer is "not answered".
    fn probe_from(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
        addrs: Arc<[SocketAddr]>,
        first: usize,
        deadline: u64,
    ) {
        for (i, addr) in addrs.iter().enumerate().skip(first) {
            if let Ok(socket) = self.start_probe(instance, *addr) {
                self.service.get_mut(instance).probe = Some(Probe {
                    generation,
                    socket,
                    next_addr: i + 1,
                    addrs,
                    since_turn: self.turn,
                    deadline,
                });
                self.service.probes += 1;
                return;
            }
        }
        self.core
            .handle_service_probed(now, instance, generation, false);
    }

    fn start_probe(&mut self, instance: InstanceId, addr: SocketAddr) -> io::Result<TcpStream> {
        let token = token(instance, TokenKind::Probe)
            .ok_or_else(|| io::Error::other("no poll token left for the probe"))?;
        let mut socket = TcpStream::connect(addr)?;
        self.poll
            .registry()
            .register(&mut socket, token, Interest::WRITABLE)?;
        Ok(socket)
    }

    /// An instance's probe socket's readiness.
    fn probe_ready(&mut self, now: u64, instance: InstanceId, event: SocketEvent) {
        let turn = self.turn;
        let Some(probe) = self
            .service
            .get(instance)
            .and_then(|inst| inst.probe.as_ref())
            .filter(|probe| probe.since_turn != turn)
        else {
            return;
        };
        let answered = match connect_result(&probe.socket, event) {
            ConnectResult::Pending => return,
            ConnectResult::Connected => true,
            ConnectResult::Failed(_) => false,
        };
        let Some(mut probe) = self.service.get_mut(instance).probe.take() else {
            return;
        };
        self.service.probes -= 1;
        if !answered && probe.next_addr < probe.addrs.len() {
            let _ = self.poll.registry().deregister(&mut probe.socket);
            let (generation, addrs, next, deadline) = (
                probe.generation,
                Arc::clone(&probe.addrs),
                probe.next_addr,
                probe.deadline,
            );
            drop(probe);
            self.probe_from(now, instance, generation, addrs, next, deadline);
            return;
        }
        self.end_probe(now, instance, probe, answered);
    }

    /// Probes past their deadline answer "not answered".
    pub(super) fn expire_probe(&mut self, now: u64) {
        if self.service.probes == 0 {
            return;
        }
        for i in 0..self.service.instances.len() {
            let expired = self.service.instances[i]
                .probe
                .take_if(|probe| probe.deadline <= now);
            if let Some(probe) = expired {
                self.service.probes -= 1;
                self.end_probe(now, InstanceId::at(i), probe, false);
            }
        }
    }

    /// When the first probe in flight gives up, for the poll timeout.
    fn probe_deadline(&self) -> Option<u64> {
        if self.service.probes == 0 {
            return None;
        }
        self.service
            .instances
            .iter()
            .filter_map(|inst| inst.probe.as_ref().map(|probe| probe.deadline))
            .min()
    }

    fn end_probe(&mut self, now: u64, instance: InstanceId, mut probe: Probe, answered: bool) {
        let _ = self.poll.registry().deregister(&mut probe.socket);
        drop(probe.socket);
        self.core
            .handle_service_probed(now, instance, probe.generation, answered);
    }

    /// `Action::SpawnService`: `/bin/sh -c CMD` in a new session, its output
    /// on the instance's pipes, answered at once with its pid or why it
    /// could not start.
    pub(super) fn spawn_service(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
        reason: RestartReason,
        run: ServiceRef,
    ) {
        let spawned = self.start_service(instance, generation, reason, run);
        self.core.handle_service_spawned(
            now,
            instance,
            generation,
            spawned.map_err(|e| one_line(&e)),
        );
    }

    fn start_service(
        &mut self,
        instance: InstanceId,
        generation: Generation,
        reason: RestartReason,
        run: ServiceRef,
    ) -> io::Result<u32> {
        let command = self
            .service
            .table
            .get(run)
            .map(str::to_string)
            .ok_or_else(|| io::Error::other("no such service command (changed by a reload)"))?;
        let upstream = self.instance_upstream(instance)?;
        let exit_token = token(instance, TokenKind::Exit)
            .ok_or_else(|| io::Error::other("no poll token left for the service"))?;
        let source = Source::Service(instance);
        // What an earlier generation left in the pipes is credited to it.
        self.output_from(source, Writer::Upstream(instance, generation));
        let ours = [
            ("TCPLOCK_UPSTREAM_HOST", upstream.host),
            ("TCPLOCK_UPSTREAM_PORT", upstream.port.to_string()),
            ("TCPLOCK_INSTANCE", instance.to_string()),
            ("TCPLOCK_GENERATION", generation.to_string()),
            ("TCPLOCK_RESTART_REASON", reason.as_str().to_string()),
        ];
        let env = service_env(std::env::vars_os(), &ours);
        let nul = || io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command");
        let program = c"/bin/sh";
        let script = CString::new(command).map_err(|_| nul())?;
        let argv = [program, c"-c", script.as_c_str()];
        let envp: Vec<&CStr> = env.iter().map(CString::as_c_str).collect();
        let stdin = File::open("/dev/null")?;
        let [out_write, err_write] = self.output_writers(source)?;
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
        let (pid, leader) = self.spawn_leader(&spec, exit_token)?;
        drop((out_write, err_write));
        // The core starts a generation only once the last one is gone; a
        // leader it forgot would be reaped as an orphan, unwatched.
        self.unwatch_leader(instance);
        self.service.get_mut(instance).running = Some(RunningService {
            generation,
            pid,
            leader,
        });
        Ok(pid)
    }

    /// Spawns the leader watched by a pidfd under `exit_token` or, on a
    /// kernel without pidfds, by SIGCHLD (said once, as for hooks).
    fn spawn_leader(
        &mut self,
        spec: &ExecSpec<'_>,
        exit_token: Token,
    ) -> io::Result<(u32, Leader)> {
        if self.pidfds_available {
            match sys::spawn_watched(spec) {
                Ok(child) => {
                    let raw = child.pidfd.as_raw_fd();
                    let watched = self.poll.registry().register(
                        &mut SourceFd(&raw),
                        exit_token,
                        Interest::READABLE,
                    );
                    let Err(e) = watched else {
                        return Ok((child.pid, Leader::Pidfd(child)));
                    };
                    // Unwatched, its exit would go unnoticed.
                    let _ = sys::pidfd_signal(child.pidfd.as_fd(), libc::SIGKILL);
                    let _ = sys::wait_exited(&child, true);
                    self.pidfd_unwatchable(e)?;
                }
                Err(e) if sys::is_pidfd_unsupported(&e) => self.pidfds_unavailable(e),
                Err(e) => return Err(e),
            }
        }
        self.watch_sigchld()?;
        Ok((spawn_with_std(spec)?, Leader::Sigchld))
    }

    /// Takes the instance's last leader's pidfd out of the poll, if one
    /// watches it.
    fn unwatch_leader(&self, instance: InstanceId) {
        if let Some(RunningService {
            leader: Leader::Pidfd(child),
            ..
        }) = self
            .service
            .get(instance)
            .and_then(|inst| inst.running.as_ref())
        {
            let raw = child.pidfd.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
    }

    /// SIGCHLD came: every instance whose leader exited is reaped and the
    /// core told (signals coalesce: one may stand for several exits).
    pub(super) fn services_exited(&mut self, now: u64) {
        let leaders: Vec<InstanceId> = self
            .service
            .unreaped_leaders()
            .map(|(instance, _)| instance)
            .collect();
        for instance in leaders {
            self.service_exited(now, instance);
        }
    }

    /// The instance's leader's pidfd turned readable, or SIGCHLD came: if
    /// the leader exited, it is reaped and the core told.
    fn service_exited(&mut self, now: u64, instance: InstanceId) {
        let Some(running) = self
            .service
            .get(instance)
            .and_then(|inst| inst.running.as_ref())
        else {
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
        self.leader_reaped(now, instance, exit);
    }

    /// The instance's leader is reaped: forgotten as a child, its exit
    /// reported. Its session's other processes remain the core's business.
    fn leader_reaped(&mut self, now: u64, instance: InstanceId, exit: ServiceExit) {
        self.unwatch_leader(instance);
        let Some(running) = &mut self.service.get_mut(instance).running else {
            return;
        };
        running.leader = Leader::Reaped;
        let generation = running.generation;
        self.core
            .handle_service_exited(now, instance, generation, exit);
    }

    /// Whether the instance's last leader is still to be reaped.
    pub(super) fn service_leader_unreaped(&self, instance: InstanceId) -> bool {
        self.service
            .get(instance)
            .and_then(|inst| inst.running.as_ref())
            .is_some_and(|running| running.unreaped().is_some())
    }

    /// The instance whose leader `pid` is, if it is a SIGCHLD child not yet
    /// reaped (for PID 1's reaping of every child).
    pub(super) fn service_sigchld_leader(&self, pid: u32) -> Option<InstanceId> {
        self.service
            .instances
            .iter()
            .position(|inst| {
                inst.running
                    .as_ref()
                    .is_some_and(|r| r.pid == pid && matches!(r.leader, Leader::Sigchld))
            })
            .map(InstanceId::at)
    }

    /// PID 1 reaped the instance's SIGCHLD-watched leader: its status is
    /// that service's.
    pub(super) fn service_leader_status(&mut self, now: u64, instance: InstanceId, status: i32) {
        self.leader_reaped(now, instance, service_exit(status));
    }

    /// `Action::SampleService`: the live processes of the instance's
    /// generation's session and their summed RSS; exited children of it
    /// are reaped.
    pub(super) fn sample_service(
        &mut self,
        now: u64,
        instance: InstanceId,
        generation: Generation,
    ) {
        let sample = match self.session_of(instance, generation) {
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
        self.core
            .handle_service_sampled(now, instance, generation, sample);
    }

    /// `Action::SignalService`: the signal to every live process of the
    /// instance's generation's session, and to its first process group.
    pub(super) fn signal_service(
        &mut self,
        instance: InstanceId,
        generation: Generation,
        signal: StopSignal,
    ) {
        let Some(session) = self.session_of(instance, generation) else {
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
                    .field("instance", instance)
                    .field("error", e);
            }
        }
    }

    /// The session id of the instance's `generation`, if it is the last one
    /// spawned there.
    fn session_of(&self, instance: InstanceId, generation: Generation) -> Option<u32> {
        self.service
            .get(instance)?
            .running
            .as_ref()
            .filter(|running| running.generation == generation)
            .map(|running| running.pid)
    }

    /// The processes of `session`: as a subreaper, every one of them is a
    /// descendant of ours (an orphan comes to us).
    fn session_members(&mut self, session: u32) -> Vec<sys::ProcStat> {
        self.processes(|p| p.session == session)
    }

    /// The processes `keep` accepts among those that may concern us: our
    /// descendants as a subreaper (a walk of our own tree, whose cost
    /// follows its size), else every process (where the kernel lists no
    /// children, or orphans go to init).
    fn processes(&mut self, keep: impl Fn(&sys::ProcStat) -> bool) -> Vec<sys::ProcStat> {
        if self.service.subreaper
            && let Ok(mut tree) = sys::descendants(sys::own_ids().0, MAX_TREE)
        {
            tree.retain(keep);
            return tree;
        }
        match sys::scan_processes(keep) {
            Ok(found) => found,
            Err(e) => {
                if let Some(line) = self.logger.line(LogLevel::Warn, "proc_scan_failed") {
                    line.field("error", e);
                }
                Vec::new()
            }
        }
    }

    /// SIGCHLD: an orphan handed to us as subreaper (or a child of ours
    /// that is not pidfd-watched) exited. The binary reaps every exited
    /// child of ours outside its own process group that nobody else waits
    /// for. A library reaps only the services' (those of their sessions):
    /// the host's children, whatever their group, are the host's to wait for.
    pub(super) fn reap_service_orphans(&mut self) {
        if !self.service.supervised {
            return;
        }
        let (own_pid, own_group) = sys::own_ids();
        let host_children_ours = self.options.handle_signals;
        let sessions: HashSet<u32> = self
            .service
            .instances
            .iter()
            .filter_map(|inst| inst.running.as_ref().map(|running| running.pid))
            .collect();
        let zombies = self.processes(|p| {
            p.is_dead()
                && p.ppid == own_pid
                && p.pgrp != own_group
                && (host_children_ours || sessions.contains(&p.session))
        });
        self.reap_zombies(&zombies);
    }

    /// A library's host keeps its process as it was: orphans go to init
    /// again once this lock stops.
    pub(super) fn stop_supervising(&mut self) {
        if self.service.subreaper && !self.options.handle_signals {
            let _ = sys::set_child_subreaper(false);
            self.service.subreaper = false;
        }
    }

    /// Reaps those of `processes` that are exited children of ours and not
    /// waited for elsewhere (a service leader, the running hook).
    fn reap_zombies(&mut self, processes: &[sys::ProcStat]) {
        let (own_pid, _) = sys::own_ids();
        let leaders: HashSet<u32> = self
            .service
            .unreaped_leaders()
            .map(|(_, pid)| pid)
            .collect();
        for process in processes {
            if !process.is_dead()
                || process.ppid != own_pid
                || leaders.contains(&process.pid)
                || self.is_hook_pid(process.pid)
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

    /// How long the poll may sleep before the shell's own service deadline
    /// (the first probe's), given `timeout` from the core.
    pub(super) fn service_timeout(&self, now: u64, timeout: Option<Duration>) -> Option<Duration> {
        if self.outputs.more {
            return Some(Duration::ZERO);
        }
        match self.probe_deadline() {
            Some(deadline) => super::sooner(timeout, super::until(now, deadline)),
            None => timeout,
        }
    }
}

/// An error as one line, for `upstream_start_failed why=`.
fn one_line(error: &io::Error) -> String {
    error.to_string().replace(['\n', '\r'], " ")
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.stop_supervising();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn each_instance_has_its_own_tokens_found_back_by_arithmetic() {
        let kinds = [
            TokenKind::Exit,
            TokenKind::Stdout,
            TokenKind::Stderr,
            TokenKind::Probe,
        ];
        let mut seen = std::collections::HashSet::new();
        for id in [1, 2, 3, 1024, 1025, 4096] {
            for kind in kinds {
                let Some(Token(t)) = token(InstanceId(id), kind) else {
                    panic!("no token for instance {id}");
                };
                assert!(t >= FIRST_SERVICE_TOKEN);
                assert!(seen.insert(t), "token {t} given twice");
                assert_eq!(token_owner(t), Some((InstanceId(id), kind)));
            }
        }
        assert_eq!(
            token(InstanceId(1), TokenKind::Exit),
            Some(Token(FIRST_SERVICE_TOKEN))
        );
        assert_eq!(token_owner(FIRST_SERVICE_TOKEN - 1), None);
    }

    #[test]
    fn the_command_alone_names_the_service() {
        let args = [
            "-l",
            "9000",
            "-u",
            "127.0.0.1:8100",
            "--spawn",
            "exec server",
        ];
        let raw = match crate::config::cli::parse_from(args) {
            Ok(crate::config::cli::Command::Run(raw)) => raw,
            other => panic!("{other:?}"),
        };
        let mut config = crate::config::load(&raw).expect("a valid config");
        let mut table = ServiceTable::default();
        let first = table.update(&config);
        assert!(first.is_some());
        // Another instance list is the instances' business, not a new command.
        config.upstreams = vec![HostPort {
            host: "127.0.0.1".into(),
            port: 9,
        }];
        assert_eq!(table.update(&config), first);
        config.spawn = Some("exec other".into());
        let second = table.update(&config);
        assert!(second.is_some() && second != first);
        assert_eq!(table.get(second.unwrap()), Some("exec other"));
        assert_eq!(table.get(first.unwrap()), None);
        config.spawn = None;
        assert_eq!(table.update(&config), None);
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
