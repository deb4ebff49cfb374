//! The control socket (`--control PATH`): one command line per connection,
//! answered in logfmt lines ending with `ok` or `error msg="..."`, then closed.
//!
//! Served by the loop itself and never blocking it: at most
//! [`MAX_CONTROL_CONNS`] connections, each with a command line of at most
//! [`MAX_LINE`] bytes, closed after [`IDLE_MS`] without progress; a reply
//! larger than the socket buffer is written as the client reads it. A `drain`
//! or `reload` keeps its connection until the answer is known; a drain's
//! `DUR` is a shell deadline fed into the poll timeout, like the idle ones.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use mio::net::{UnixListener, UnixStream};
use slab::Slab;

use super::*;
use crate::core::{
    ConnId, CoreStatus, InstanceId, InstanceStats, PositionError, ServiceStateName, ServiceStats,
    Target,
};
use log::push_value;

/// The control listener's poll token (reserved for it by the lead).
pub(super) const CONTROL_LISTENER: Token = Token(12);
/// Control connections take tokens from here, one per slot.
pub(super) const FIRST_CONTROL_TOKEN: usize = 16;
/// Control connections served at once; one more is told so and closed.
pub(super) const MAX_CONTROL_CONNS: usize = 16;
/// The longest command line, newline aside.
pub(super) const MAX_LINE: usize = 1024;
/// A control connection that neither sends nor reads for this long is closed.
pub(super) const IDLE_MS: u64 = 5_000;

// ----- commands -----

/// A command line, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Status,
    Conns,
    Position(Target),
    Pause,
    Resume,
    /// Pause, then answer once no permit is held; give up after this many ms.
    Drain(Option<u64>),
    /// `restart`, `restart all` or `restart INSTANCE`: `None` means all.
    Restart(Option<u32>),
    Kill(ConnId),
    Reload,
    Stop,
}

/// Parses one command line (without its newline). Pure; the error is the
/// reply's `msg`.
pub(crate) fn parse_command(line: &str) -> Result<Command, String> {
    let mut words = line.split_ascii_whitespace();
    let Some(name) = words.next() else {
        return Err("empty command".to_string());
    };
    let arg = words.next();
    if let Some(extra) = words.next() {
        return Err(format!("{name}: unexpected argument '{extra}'"));
    }
    let no_arg = |command| match arg {
        None => Ok(command),
        Some(a) => Err(format!("{name} takes no argument, got '{a}'")),
    };
    match name {
        "status" => no_arg(Command::Status),
        "conns" => no_arg(Command::Conns),
        "pause" => no_arg(Command::Pause),
        "resume" => no_arg(Command::Resume),
        "reload" => no_arg(Command::Reload),
        "stop" => no_arg(Command::Stop),
        "position" => {
            let arg = arg.ok_or("position needs ADDR:PORT or CONN")?;
            if let Ok(addr) = arg.parse::<SocketAddr>() {
                Ok(Command::Position(Target::Client(addr)))
            } else if let Some(id) = parse_conn(arg) {
                Ok(Command::Position(Target::Conn(id)))
            } else {
                Err(format!("position: '{arg}' is neither ADDR:PORT nor CONN"))
            }
        }
        "kill" => {
            let arg = arg.ok_or("kill needs CONN")?;
            parse_conn(arg)
                .map(Command::Kill)
                .ok_or_else(|| format!("kill: '{arg}' is not a connection id"))
        }
        "drain" => match arg {
            None => Ok(Command::Drain(None)),
            Some(dur) => {
                let d = crate::config::units::parse_duration(dur)
                    .map_err(|e| format!("drain: '{dur}': {e}"))?;
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                Ok(Command::Drain(Some(ms)))
            }
        },
        "restart" => match arg {
            None | Some("all") => Ok(Command::Restart(None)),
            Some(n) => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .map(|n| Command::Restart(Some(n)))
                .ok_or_else(|| format!("restart: '{n}' is neither an instance nor 'all'")),
        },
        other => Err(format!("unknown command '{other}'")),
    }
}

/// Parses the bytes of a command line, newline gone and a `\r` before it
/// allowed. Pure; the error is the reply's `msg`.
pub(crate) fn parse_line(bytes: &[u8]) -> Result<Command, String> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.len() > MAX_LINE {
        return Err(format!("command line longer than {MAX_LINE} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    parse_command(text)
}

fn parse_conn(text: &str) -> Option<ConnId> {
    text.parse::<u64>().ok().filter(|id| *id > 0).map(ConnId)
}

// ----- replies -----

/// A reply under construction: logfmt lines, the last one `ok` or `error`.
#[derive(Default)]
pub(super) struct Reply(String);

impl Reply {
    /// Starts a line with its first field.
    fn line(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.end_line();
        self.pair(key, value)
    }

    /// Adds a field to the current line.
    fn field(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.0.push(' ');
        self.pair(key, value)
    }

    /// Adds a field to the current line when there is a value.
    fn field_opt(&mut self, key: &str, value: Option<impl fmt::Display>) -> &mut Self {
        match value {
            Some(value) => self.field(key, value),
            None => self,
        }
    }

    fn pair(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.0.push_str(key);
        self.0.push('=');
        push_value(&mut self.0, value);
        self
    }

    fn end_line(&mut self) {
        if !self.0.is_empty() && !self.0.ends_with('\n') {
            self.0.push('\n');
        }
    }

    fn ok(mut self) -> Vec<u8> {
        self.end_line();
        self.0.push_str("ok\n");
        self.0.into_bytes()
    }

    fn error(mut self, msg: impl fmt::Display) -> Vec<u8> {
        self.end_line();
        self.0.push_str("error msg=");
        push_value(&mut self.0, msg);
        self.0.push('\n');
        self.0.into_bytes()
    }
}

fn error_reply(msg: impl fmt::Display) -> Vec<u8> {
    Reply::default().error(msg)
}

/// What `status` reports, taken at one instant: one line for tcplock and
/// one per upstream instance.
pub(super) struct StatusSnapshot {
    pub(super) core: CoreStatus,
    pub(super) draining: bool,
    /// Every instance of the pool, in number order (removed ones still
    /// draining included).
    pub(super) instances: Vec<InstanceStats>,
}

impl StatusSnapshot {
    fn state(&self) -> &'static str {
        if self.core.stopping {
            "stopping"
        } else if self.draining {
            "draining"
        } else if self.core.paused {
            "paused"
        } else {
            "running"
        }
    }

    fn write(&self, reply: &mut Reply) {
        let c = &self.core;
        reply
            .line("state", self.state())
            .field("queued", c.queued)
            .field("active", c.active)
            .field("permits", c.permits)
            .field("oldest_wait_ms", c.oldest_wait_ms)
            .field("accepted", c.accepted)
            .field("activations", c.activations)
            .field("timeouts", c.timeouts);
        for outcome in Outcome::ALL {
            reply.field(outcome.as_str(), c.outcomes.count(outcome));
        }
        for inst in &self.instances {
            write_instance(reply, inst);
        }
    }
}

/// One instance's `status` line. An instance tcplock does not run is taken
/// as ready, as the metrics show it, and its connections are its
/// activations.
fn write_instance(reply: &mut Reply, inst: &InstanceStats) {
    let s = &inst.service;
    let state = s.state.map_or("ready", ServiceStateName::as_str);
    let conns = if s.state.is_some() {
        s.conns
    } else {
        inst.activations
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    reply
        .line("instance", inst.id)
        .field("addr", &inst.upstream)
        .field("state", state)
        .field("supervised", yes_no(s.state.is_some()))
        .field("gen", s.generation)
        .field_opt("pid", s.pid)
        .field("rss_kib", s.rss_kib)
        .field("active", inst.active)
        .field("conns", conns)
        .field("restarts", s.restarts.iter().sum::<u64>())
        .field("cooling_down", yes_no(inst.cooling_down))
        .field("removed", yes_no(inst.removed));
}

/// The pool's capacity: `permits` (each instance's) times the instances a
/// reload did not remove; at least `permits`, as a single upstream has.
pub(super) fn pool_permits(permits: u32, instances: &[InstanceStats]) -> u64 {
    let live = instances.iter().filter(|inst| !inst.removed).count().max(1);
    u64::from(permits).saturating_mul(live as u64)
}

// ----- the server -----

/// The checks before binding the control socket at `path`, binding
/// nothing (`--check` runs them too): its directory exists, and whatever is
/// at the path is a socket nobody listens on. `true` if such a stale
/// socket is there, to be replaced.
pub(crate) fn check_control_path(path: &Path) -> Result<bool, Error> {
    let fail =
        |message: String| Error::Invalid(format!("control socket {}: {message}", path.display()));
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(fail(format!("{} is not a directory", dir.display()))),
        Err(e) => return Err(fail(format!("directory {}: {e}", dir.display()))),
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
                Ok(_) => Err(fail("another process listens on it".to_string())),
                Err(e) => Err(fail(format!("exists and cannot be probed: {e}"))),
            }
        }
        Ok(_) => Err(fail("exists and is not a socket".to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Appends `conns` lines from slab slot `from` on (slab order, not id
/// order: no sort, no list of them all) until about [`CONNS_PART`] bytes;
/// the slot to go on from, or `None` once the listing and its `ok` are in.
fn conns_part(
    out: &mut Vec<u8>,
    mut from: usize,
    now: u64,
    core: &Core,
    io: &[Option<ConnIo>],
) -> Option<usize> {
    // `out` is empty: its room is reused, one buffer per connection.
    let mut reply = Reply(String::from_utf8(std::mem::take(out)).unwrap_or_default());
    while reply.0.len() < CONNS_PART {
        let Some(info) = core.conn_info_from(now, from) else {
            *out = reply.ok();
            return None;
        };
        from = info.conn.slot() + 1;
        let stage = io
            .get(info.conn.slot())
            .and_then(Option::as_ref)
            .filter(|io| io.conn == info.conn)
            .map(|io| &io.stage);
        let (up, down) = match stage {
            Some(Stage::Relaying(relay)) => relay.bytes(),
            _ => (0, 0),
        };
        reply
            .line("conn", info.conn.id())
            .field("state", info.state.as_str())
            .field("client", info.client)
            .field_opt("instance", info.instance)
            .field("age_ms", info.age_ms)
            .field("waited_ms", info.waited_ms)
            .field("bytes_up", up)
            .field("bytes_down", down);
    }
    reply.end_line();
    *out = reply.0.into_bytes();
    Some(from)
}

/// Reads and drops what the client sent and nobody will read (at most
/// 64 KiB, without waiting), so closing does not reset the connection.
fn discard_input(stream: &mut UnixStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
}

/// The listener and its connections.
pub(super) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: Slab<CtlConn>,
}

struct CtlConn {
    stream: UnixStream,
    /// The command line read so far.
    line: Vec<u8>,
    phase: Phase,
    /// Idle close, while reading or writing.
    idle_deadline: u64,
}

enum Phase {
    Reading,
    /// The answer comes later.
    Waiting(Pending),
    Writing {
        out: Vec<u8>,
        written: usize,
        /// `conns`: the slab slot its listing goes on from once `out` is
        /// written; `None` when `out` is the end of the reply.
        more: Option<usize>,
    },
}

/// A `conns` listing is written in parts of about this size, each built
/// once the one before is in the socket.
const CONNS_PART: usize = 64 * 1024;

enum Pending {
    /// `drain`: answered once no permit is held, or with a timeout then.
    Drain { until: Option<u64> },
    /// `reload`: answered when the reload thread numbered `run` reports.
    Reload { run: u64 },
    /// `restart`: answered once each instance named has a ready generation
    /// after the one it ran when asked, or with an error once one failed.
    /// At most [`MAX_CONTROL_CONNS`] connections wait, each with at most
    /// the pool's instances.
    Restart(Box<[RestartWait]>),
}

/// One instance a `restart` waits for.
struct RestartWait {
    id: u32,
    /// Its address when asked: a reload that removes the instance (and
    /// perhaps gives its number to another) ends the wait for it.
    upstream: String,
    /// Its generation when asked.
    after: u64,
}

/// Where one instance of a waiting `restart` stands.
#[derive(PartialEq, Eq)]
enum Restarted {
    /// A generation after the one asked about is ready: its number and pid.
    Ready(u64, Option<u32>),
    /// Still on its way.
    Waiting,
    /// Removed by a reload meanwhile: nothing left to wait for.
    Gone,
    /// Its service failed.
    Failed,
}

impl RestartWait {
    fn of(inst: &InstanceStats) -> RestartWait {
        RestartWait {
            id: inst.id,
            upstream: inst.upstream.clone(),
            after: inst.service.generation,
        }
    }

    /// Where it stands, given its instance's name and service numbers
    /// while the core lists it and no reload removed it.
    fn state(&self, found: Option<(&str, ServiceStats)>) -> Restarted {
        let Some((_, s)) = found.filter(|(name, _)| *name == self.upstream) else {
            return Restarted::Gone;
        };
        match s.state {
            None => Restarted::Gone,
            Some(ServiceStateName::Failed) => Restarted::Failed,
            Some(ServiceStateName::Ready) if s.generation > self.after => {
                Restarted::Ready(s.generation, s.pid)
            }
            Some(_) => Restarted::Waiting,
        }
    }
}

/// The answer to a waiting `restart`, once it is known: a line per
/// instance restarted (`instance=I gen=G pid=P`), or an error. `lookup`
/// gives an instance's name and service while it is listed and not
/// removed; nothing is allocated while the answer is not known yet.
fn restart_answer<'a>(
    waits: &[RestartWait],
    lookup: impl Fn(u32) -> Option<(&'a str, ServiceStats)>,
) -> Option<Vec<u8>> {
    let state = |wait: &RestartWait| wait.state(lookup(wait.id));
    if waits.iter().any(|w| state(w) == Restarted::Failed) {
        return Some(error_reply("upstream failed"));
    }
    if waits.iter().any(|w| state(w) == Restarted::Waiting) {
        return None;
    }
    let mut reply = Reply::default();
    for wait in waits {
        if let Restarted::Ready(generation, pid) = state(wait) {
            reply
                .line("instance", wait.id)
                .field("gen", generation)
                .field("pid", pid.unwrap_or(0));
        }
    }
    Some(match waits {
        [only] if reply.0.is_empty() => {
            error_reply(format_args!("instance {} was removed", only.id))
        }
        _ => reply.ok(),
    })
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600): a stale socket file nobody
    /// listens on is replaced, any other file is an error naming it.
    pub(super) fn bind(path: &Path, poll: &Poll) -> Result<ControlServer, Error> {
        let fail = |message: String| {
            Error::Invalid(format!("control socket {}: {message}", path.display()))
        };
        if check_control_path(path)? {
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
        }
        let listener =
            sys::bind_private_unix_listener(path, 64).map_err(|e| fail(e.to_string()))?;
        // From here on, dropping the server removes the file.
        let mut server = ControlServer {
            listener: UnixListener::from_std(listener),
            path: path.to_owned(),
            conns: Slab::with_capacity(MAX_CONTROL_CONNS),
        };
        poll.registry()
            .register(&mut server.listener, CONTROL_LISTENER, Interest::READABLE)
            .map_err(|e| fail(format!("cannot register: {e}")))?;
        Ok(server)
    }

    /// Control connections open.
    pub(super) fn open_conns(&self) -> usize {
        self.conns.len()
    }

    /// The earliest idle or drain deadline.
    fn next_deadline(&self) -> Option<u64> {
        self.conns
            .iter()
            .filter_map(|(_, c)| match c.phase {
                Phase::Reading | Phase::Writing { .. } => Some(c.idle_deadline),
                Phase::Waiting(Pending::Drain { until }) => until,
                Phase::Waiting(Pending::Reload { .. } | Pending::Restart { .. }) => None,
            })
            .min()
    }

    fn close(&mut self, poll: &Poll, slot: usize) {
        if let Some(mut conn) = self.conns.try_remove(slot) {
            let _ = poll.registry().deregister(&mut conn.stream);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Shell {
    /// Accepts every waiting control client; beyond [`MAX_CONTROL_CONNS`]
    /// one is told so and closed.
    pub(super) fn control_accept(&mut self, now: u64) {
        loop {
            let Some(server) = &mut self.control else {
                return;
            };
            let mut stream = match server.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if let Some(line) = self.logger.line(LogLevel::Warn, "control_accept_failed") {
                        line.field("error", e);
                    }
                    return;
                }
            };
            if server.conns.len() >= MAX_CONTROL_CONNS {
                // One small write into an empty socket buffer: it fits.
                let _ = stream.write(&error_reply(format_args!(
                    "too many control connections (at most {MAX_CONTROL_CONNS})"
                )));
                // Its command, if already sent, would turn the close into a
                // reset the client sees before the error line.
                discard_input(&mut stream);
                continue;
            }
            let entry = server.conns.vacant_entry();
            let token = Token(FIRST_CONTROL_TOKEN + entry.key());
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            let slot = entry.key();
            entry.insert(CtlConn {
                stream,
                line: Vec::new(),
                phase: Phase::Reading,
                idle_deadline: now.saturating_add(IDLE_MS),
            });
            // The line may be there already.
            self.control_ready(now, slot, false);
        }
    }

    /// A control connection is readable or writable: read its line, or
    /// write more of its reply.
    /// `peer_gone`: the poll saw the client hang up entirely.
    pub(super) fn control_ready(&mut self, now: u64, slot: usize, peer_gone: bool) {
        let Some(server) = &mut self.control else {
            return;
        };
        let Some(conn) = server.conns.get_mut(slot) else {
            return;
        };
        match conn.phase {
            Phase::Reading => {}
            Phase::Waiting(_) => {
                // A client that went away stops waiting (a drain stays
                // paused); one that only ended its sending still gets the
                // answer. What it sent after its line is discarded.
                let mut sink = [0u8; 256];
                let mut failed = peer_gone;
                loop {
                    match conn.stream.read(&mut sink) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    server.close(&self.poll, slot);
                }
                return;
            }
            Phase::Writing { .. } => {
                self.control_write(now, slot);
                return;
            }
        }
        let mut buf = [0u8; MAX_LINE + 2];
        let line = loop {
            let room = (MAX_LINE + 2)
                .saturating_sub(conn.line.len())
                .min(buf.len());
            match conn.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    if conn.line.is_empty() {
                        server.close(&self.poll, slot);
                        return;
                    }
                    break Ok(std::mem::take(&mut conn.line));
                }
                Ok(n) => {
                    conn.idle_deadline = now.saturating_add(IDLE_MS);
                    conn.line.extend_from_slice(&buf[..n]);
                    if let Some(end) = conn.line.iter().position(|b| *b == b'\n') {
                        conn.line.truncate(end);
                        break Ok(std::mem::take(&mut conn.line));
                    }
                    if conn.line.len() > MAX_LINE {
                        break Err(format!("command line longer than {MAX_LINE} bytes"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    server.close(&self.poll, slot);
                    return;
                }
            }
        };
        let reply = match line.and_then(|bytes| parse_line(&bytes)) {
            Err(msg) => Some(error_reply(msg)),
            Ok(command) => self.run_command(now, slot, command),
        };
        if let Some(reply) = reply {
            self.control_reply(now, slot, reply);
        }
    }

    /// Carries out one command; `None` when the answer comes later.
    fn run_command(&mut self, now: u64, slot: usize, command: Command) -> Option<Vec<u8>> {
        let reply = match command {
            Command::Status => {
                let mut reply = Reply::default();
                self.status_snapshot(now).write(&mut reply);
                reply.ok()
            }
            Command::Conns => {
                self.control_write_from(now, slot, Vec::new(), Some(0));
                return None;
            }
            Command::Position(target) => match self.core.position(now, target) {
                Ok(p) => {
                    let mut reply = Reply::default();
                    reply
                        .line("conn", p.conn)
                        .field("position", p.position)
                        .field("ahead", p.ahead)
                        .field("waited_ms", p.waited_ms)
                        .field(
                            "eta_ms",
                            p.eta_ms.map_or("unknown".to_string(), |ms| ms.to_string()),
                        )
                        .field("free_permits", p.free_permits);
                    reply.ok()
                }
                Err(PositionError::Unknown) => error_reply(format_args!(
                    "no connection {}",
                    match target {
                        Target::Conn(id) => id.to_string(),
                        Target::Client(addr) => addr.to_string(),
                    }
                )),
                Err(PositionError::NotWaiting(state)) => {
                    error_reply(format_args!("not waiting in line: {}", state.as_str()))
                }
            },
            Command::Pause => {
                self.core.handle_pause(now);
                self.drain(now);
                Reply::default().ok()
            }
            Command::Resume => {
                self.core.handle_resume(now);
                self.drain(now);
                self.control_answer_drains(now, Some("resumed before the drain completed"));
                Reply::default().ok()
            }
            // Its answer would come after the exit: nothing waits once
            // stopping.
            Command::Drain(_) | Command::Restart(_) | Command::Reload
                if self.core.is_stopping() =>
            {
                error_reply("stopping")
            }
            Command::Drain(dur) => {
                self.core.handle_pause(now);
                self.drain(now);
                if self.core.active() == 0 {
                    Reply::default().ok()
                } else {
                    let until = dur.map(|ms| now.saturating_add(ms));
                    self.control_wait(slot, Pending::Drain { until });
                    return None;
                }
            }
            Command::Restart(target) => {
                let instances = self.core.stats().instances;
                let live = instances.iter().filter(|inst| !inst.removed);
                let chosen: Vec<&InstanceStats> = match target {
                    None => live.collect(),
                    Some(id) => live.filter(|inst| inst.id == id).collect(),
                };
                match target {
                    Some(id) if chosen.is_empty() => error_reply(format_args!("no instance {id}")),
                    _ if chosen.iter().all(|inst| inst.service.state.is_none()) => {
                        error_reply("restart needs --spawn")
                    }
                    _ => {
                        let waits: Box<[RestartWait]> = chosen
                            .iter()
                            .filter(|inst| inst.service.state.is_some())
                            .map(|inst| RestartWait::of(inst))
                            .collect();
                        self.core
                            .handle_service_restart(now, target.map(InstanceId));
                        self.drain(now);
                        self.control_wait(slot, Pending::Restart(waits));
                        self.control_answer_restarts(now);
                        return None;
                    }
                }
            }
            Command::Kill(id) => {
                if self.core.handle_kill(now, id) {
                    self.drain(now);
                    Reply::default().ok()
                } else {
                    error_reply(format_args!("no connection {id}"))
                }
            }
            Command::Reload => {
                if self.config.config_file.is_none() || self.options.reload_args.is_none() {
                    error_reply("no config file given with -c")
                } else {
                    // A reload under way may have read the file before the
                    // operator's edit: the answer is the next one's.
                    let was_running = self.reload_running;
                    self.reload();
                    if !self.reload_running {
                        error_reply("cannot start the reload thread")
                    } else {
                        let run = self.reloads_started + u64::from(was_running);
                        self.control_wait(slot, Pending::Reload { run });
                        return None;
                    }
                }
            }
            Command::Stop => {
                self.core.handle_shutdown(now);
                self.drain(now);
                Reply::default().ok()
            }
        };
        Some(reply)
    }

    /// The `status` numbers at this instant.
    pub(super) fn status_snapshot(&self, now: u64) -> StatusSnapshot {
        let draining = self.control.as_ref().is_some_and(|server| {
            server
                .conns
                .iter()
                .any(|(_, c)| matches!(c.phase, Phase::Waiting(Pending::Drain { .. })))
        });
        StatusSnapshot {
            core: self.core.status(now),
            draining,
            instances: self.core.stats().instances,
        }
    }

    fn control_wait(&mut self, slot: usize, pending: Pending) {
        if let Some(conn) = self.control.as_mut().and_then(|s| s.conns.get_mut(slot)) {
            conn.phase = Phase::Waiting(pending);
        }
    }

    /// Starts writing `reply`, as much as the socket takes now.
    fn control_reply(&mut self, now: u64, slot: usize, reply: Vec<u8>) {
        self.control_write_from(now, slot, reply, None);
    }

    /// Starts writing `out`, then the `conns` listing from slot `more`.
    fn control_write_from(&mut self, now: u64, slot: usize, out: Vec<u8>, more: Option<usize>) {
        if let Some(conn) = self.control.as_mut().and_then(|s| s.conns.get_mut(slot)) {
            conn.phase = Phase::Writing {
                out,
                written: 0,
                more,
            };
            conn.idle_deadline = now.saturating_add(IDLE_MS);
            self.control_write(now, slot);
        }
    }

    fn control_write(&mut self, now: u64, slot: usize) {
        let Some(server) = &mut self.control else {
            return;
        };
        let Some(conn) = server.conns.get_mut(slot) else {
            return;
        };
        let Phase::Writing { out, written, more } = &mut conn.phase else {
            return;
        };
        // A `conns` listing is built a part at a time, the next once the
        // socket took the last: the work per writable edge is bounded by
        // the socket's buffer, and a stalled reader costs one part.
        'parts: loop {
            while *written < out.len() {
                match conn.stream.write(&out[*written..]) {
                    Ok(0) => break 'parts,
                    Ok(n) => {
                        *written += n;
                        conn.idle_deadline = now.saturating_add(IDLE_MS);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break 'parts,
                }
            }
            let Some(from) = *more else {
                break;
            };
            out.clear();
            *written = 0;
            *more = conns_part(out, from, now, &self.core, &self.io);
        }
        // Unread input would turn the client's end of stream into a reset
        // (an overlong line, say): discard a bounded amount of it first.
        discard_input(&mut conn.stream);
        server.close(&self.poll, slot);
    }

    /// Answers waiting drains: with `error`, or each whose permits are all
    /// back (`ok`) or whose time ran out (`error msg=timeout`).
    fn control_answer_drains(&mut self, now: u64, error: Option<&str>) {
        let idle = self.core.active() == 0;
        self.control_answer(now, |_, phase| match (phase, error) {
            (Phase::Waiting(Pending::Drain { .. }), Some(msg)) => Some(error_reply(msg)),
            (Phase::Waiting(Pending::Drain { .. }), None) if idle => Some(Reply::default().ok()),
            (Phase::Waiting(Pending::Drain { until: Some(t) }), None) if *t <= now => {
                Some(error_reply("timeout"))
            }
            _ => None,
        });
    }

    /// Starts writing `answer`'s reply to each connection it gives one;
    /// `answer` sees the core as it is now. Empty (no allocation) until
    /// some connection is answered.
    fn control_answer(
        &mut self,
        now: u64,
        mut answer: impl FnMut(&Core, &Phase) -> Option<Vec<u8>>,
    ) {
        let Some(server) = &self.control else {
            return;
        };
        let core = &self.core;
        let answers: Vec<(usize, Vec<u8>)> = server
            .conns
            .iter()
            .filter_map(|(slot, c)| answer(core, &c.phase).map(|reply| (slot, reply)))
            .collect();
        for (slot, reply) in answers {
            self.control_reply(now, slot, reply);
        }
    }

    /// A reload thread (the `run`th started) reported: answer the `reload`
    /// commands that waited for it.
    pub(super) fn control_reloaded(
        &mut self,
        now: u64,
        run: u64,
        result: Result<Vec<&str>, String>,
    ) {
        self.control_answer(now, |_, phase| {
            if !matches!(phase, Phase::Waiting(Pending::Reload { run: r }) if *r <= run) {
                return None;
            }
            Some(match &result {
                Ok(changed) => {
                    let mut reply = Reply::default();
                    reply.line("changed", CommaList(changed));
                    reply.ok()
                }
                Err(msg) => error_reply(msg),
            })
        });
    }

    /// Once per loop turn: close idle control connections, answer drains.
    pub(super) fn control_tick(&mut self, now: u64) {
        let Some(server) = &mut self.control else {
            return;
        };
        let idle: Vec<usize> = server
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.phase, Phase::Reading | Phase::Writing { .. }) && c.idle_deadline <= now
            })
            .map(|(slot, _)| slot)
            .collect();
        for slot in idle {
            server.close(&self.poll, slot);
        }
        self.control_answer_drains(now, None);
        self.control_answer_restarts(now);
    }

    /// Answers `restart` commands whose instances all have a new ready
    /// generation (or one of which failed).
    fn control_answer_restarts(&mut self, now: u64) {
        self.control_answer(now, |core, phase| {
            let Phase::Waiting(Pending::Restart(waits)) = phase else {
                return None;
            };
            // The pool's numbers are taken only while a restart waits.
            restart_answer(waits, |id: u32| {
                let instance = InstanceId(id);
                Some((
                    core.instance_name(instance)?,
                    core.instance_service(instance)?,
                ))
            })
        });
    }

    /// Answers every waiting `drain`, `reload` and `restart` with an error:
    /// when shutdown begins (their answer would never come), or when the
    /// reload thread they wait for could not start.
    pub(super) fn control_fail_waiters(&mut self, now: u64, reload_only: bool, msg: &str) {
        self.control_answer(now, |_, phase| {
            let waiting = match phase {
                Phase::Waiting(Pending::Reload { .. }) => true,
                Phase::Waiting(_) => !reload_only,
                _ => false,
            };
            waiting.then(|| error_reply(msg))
        });
    }

    /// The next control deadline, if any.
    pub(super) fn control_deadline(&self) -> Option<u64> {
        self.control.as_ref().and_then(ControlServer::next_deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ServiceStats;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse_command("status"), Ok(Command::Status));
        assert_eq!(parse_command("  conns  "), Ok(Command::Conns));
        assert_eq!(parse_command("pause"), Ok(Command::Pause));
        assert_eq!(parse_command("resume"), Ok(Command::Resume));
        assert_eq!(parse_command("reload"), Ok(Command::Reload));
        assert_eq!(parse_command("stop"), Ok(Command::Stop));
        assert_eq!(parse_command("drain"), Ok(Command::Drain(None)));
        assert_eq!(parse_command("drain 2s"), Ok(Command::Drain(Some(2000))));
        assert_eq!(parse_command("drain 250"), Ok(Command::Drain(Some(250))));
        assert_eq!(parse_command("kill 7"), Ok(Command::Kill(ConnId(7))));
        assert_eq!(parse_command("restart"), Ok(Command::Restart(None)));
        assert_eq!(parse_command("restart all"), Ok(Command::Restart(None)));
        assert_eq!(parse_command("restart 2"), Ok(Command::Restart(Some(2))));
        assert_eq!(
            parse_command("position 3"),
            Ok(Command::Position(Target::Conn(ConnId(3))))
        );
        assert_eq!(
            parse_command("position 127.0.0.1:4000"),
            Ok(Command::Position(Target::Client(
                "127.0.0.1:4000".parse().unwrap()
            )))
        );
        assert_eq!(
            parse_command("position [::1]:4000"),
            Ok(Command::Position(Target::Client(
                "[::1]:4000".parse().unwrap()
            )))
        );
    }

    #[test]
    fn rejects_bad_commands_with_a_reason() {
        for (line, msg) in [
            ("", "empty command"),
            ("frobnicate", "unknown command 'frobnicate'"),
            ("status now", "status takes no argument, got 'now'"),
            ("kill", "kill needs CONN"),
            ("kill x", "kill: 'x' is not a connection id"),
            ("kill 0", "kill: '0' is not a connection id"),
            ("kill 1 2", "kill: unexpected argument '2'"),
            ("position", "position needs ADDR:PORT or CONN"),
            (
                "position host:80",
                "position: 'host:80' is neither ADDR:PORT nor CONN",
            ),
            ("restart 0", "restart: '0' is neither an instance nor 'all'"),
        ] {
            assert_eq!(parse_command(line), Err(msg.to_string()), "{line:?}");
        }
        assert!(
            parse_command("drain soon")
                .unwrap_err()
                .starts_with("drain: 'soon'")
        );
    }

    fn instance(id: u32, state: Option<ServiceStateName>, generation: u64) -> InstanceStats {
        InstanceStats {
            id,
            upstream: format!("127.0.0.1:{}", 8100 + id),
            service: ServiceStats {
                state,
                generation,
                pid: state.map(|_| 1000 + id),
                ..ServiceStats::default()
            },
            ..InstanceStats::default()
        }
    }

    fn text(reply: Vec<u8>) -> String {
        String::from_utf8(reply).unwrap()
    }

    #[test]
    fn status_has_a_line_per_instance_and_the_pools_capacity() {
        let mut a = instance(1, None, 0);
        a.active = 1;
        a.activations = 7;
        let mut b = instance(2, None, 0);
        b.cooling_down = true;
        let mut c = instance(3, None, 0);
        c.removed = true;
        let snapshot = StatusSnapshot {
            core: CoreStatus {
                paused: false,
                stopping: false,
                queued: 0,
                active: 1,
                permits: 4,
                oldest_wait_ms: 0,
                accepted: 7,
                activations: 7,
                timeouts: 0,
                outcomes: Default::default(),
            },
            draining: false,
            instances: vec![a, b, c],
        };
        let mut reply = Reply::default();
        snapshot.write(&mut reply);
        let out = text(reply.ok());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(
            lines[0].contains(" permits=4 "),
            "two live instances of 2: {out}"
        );
        assert_eq!(
            lines[1],
            "instance=1 addr=127.0.0.1:8101 state=ready supervised=no gen=0 rss_kib=0 \
             active=1 conns=7 restarts=0 cooling_down=no removed=no"
        );
        assert!(lines[2].ends_with(" cooling_down=yes removed=no"), "{out}");
        assert!(lines[3].ends_with(" cooling_down=no removed=yes"), "{out}");
    }

    /// The look-up a waiting `restart` gets from the core, over `instances`.
    fn listed<'a>(
        instances: &'a [InstanceStats],
    ) -> impl Fn(u32) -> Option<(&'a str, ServiceStats)> {
        move |id| {
            instances
                .iter()
                .find(|inst| inst.id == id && !inst.removed)
                .map(|inst| (inst.upstream.as_str(), inst.service.clone()))
        }
    }

    #[test]
    fn a_restart_answers_once_every_instance_named_is_ready_again() {
        let ready = Some(ServiceStateName::Ready);
        let asked = [instance(1, ready, 3), instance(2, ready, 5)];
        let waits: Vec<RestartWait> = asked.iter().map(RestartWait::of).collect();
        // Instance 2 restarted, instance 1 not yet: no answer.
        let now = [instance(1, ready, 3), instance(2, ready, 6)];
        assert_eq!(restart_answer(&waits, listed(&now)), None);
        let starting = [
            instance(1, Some(ServiceStateName::Starting), 4),
            now[1].clone(),
        ];
        assert_eq!(restart_answer(&waits, listed(&starting)), None);
        let done = [instance(1, ready, 4), instance(2, ready, 6)];
        assert_eq!(
            text(restart_answer(&waits, listed(&done)).unwrap()),
            "instance=1 gen=4 pid=1001\ninstance=2 gen=6 pid=1002\nok\n"
        );
        // Only instance 2 asked: its own new generation answers.
        assert_eq!(
            text(restart_answer(&waits[1..], listed(&now)).unwrap()),
            "instance=2 gen=6 pid=1002\nok\n"
        );
        let failed = [
            instance(1, Some(ServiceStateName::Failed), 4),
            now[1].clone(),
        ];
        assert_eq!(
            text(restart_answer(&waits, listed(&failed)).unwrap()),
            "error msg=\"upstream failed\"\n"
        );
        // A reload removed instance 1 (or gave its number to another).
        let mut other = instance(1, ready, 9);
        other.upstream = "127.0.0.1:9999".to_string();
        assert_eq!(
            text(restart_answer(&waits[..1], listed(&[other])).unwrap()),
            "error msg=\"instance 1 was removed\"\n"
        );
        let mut removed = instance(1, ready, 3);
        removed.removed = true;
        assert_eq!(
            text(restart_answer(&waits, listed(&[removed, done[1].clone()])).unwrap()),
            "instance=2 gen=6 pid=1002\nok\n"
        );
    }

    #[test]
    fn replies_end_with_ok_or_a_quoted_error() {
        let mut reply = Reply::default();
        reply.line("a", 1).field("b", "x y");
        reply.line("c", "");
        assert_eq!(reply.ok(), b"a=1 b=\"x y\"\nc=\"\"\nok\n");
        assert_eq!(error_reply("bad \"x\""), b"error msg=\"bad \\\"x\\\"\"\n");
    }
}
