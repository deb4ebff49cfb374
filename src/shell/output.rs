//! Children's output: the service's and the hook processes' stdout and
//! stderr come through pipes the loop reads without blocking, split into
//! lines of at most [`MAX_LINE`] bytes and logged as `event=output`.
//!
//! Each source (an instance's service, an instance's hooks) has one pair
//! of pipes for as long as the core lists the instance: every spawn gets
//! the same write ends, and the loop keeps them open too. A process that a hook or a generation left behind (a
//! daemon a legacy restart script started, an escaped helper) so keeps a
//! working stdout instead of dying of SIGPIPE at its next line; its lines
//! are credited to the last hook or generation. Once a reload removed the
//! instance, its leader was reaped and the core no longer lists it, its
//! pipes are drained and closed. A source that writes faster
//! than stderr takes its lines costs dropped (and counted) log lines, never
//! a blocked loop or a blocked child.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::{Shell, service};
use crate::config::LogLevel;
use crate::core::{Generation, HookId, HookKind, InstanceId};
use crate::sys;

/// Longest line of a child's output logged as it is; the rest of a longer
/// line is dropped and the line marked `truncated=true`.
pub(super) const MAX_LINE: usize = 4096;

/// Reads of one pipe per loop turn before the others get their turn; a
/// child that writes without pause is read again next turn.
const READS_PER_TURN: usize = 16;

/// Lines of one pipe per loop turn: logging a line costs far more than
/// reading it, so a flood of short lines is paced by this, not by
/// [`READS_PER_TURN`].
const LINES_PER_TURN: usize = 1024;

/// Reads of one pipe when its writer has exited: enough for a full pipe.
const READS_AT_EXIT: usize = 32;

const READ_CHUNK: usize = 4096;

/// Whose output a pipe carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The supervised service of one instance: each has its own pipes.
    Service(InstanceId),
    /// The hook processes of one instance: one at a time runs, and each
    /// instance has its own pipes, so hooks of several instances of a pool
    /// running at once never mix their lines.
    Hook(InstanceId),
}

impl Source {
    fn instance(self) -> InstanceId {
        match self {
            Source::Service(instance) | Source::Hook(instance) => instance,
        }
    }
}

/// One pipe: its source, and 0 for stdout or 1 for stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PipeId(pub(super) Source, pub(super) usize);

/// Who the lines read now are credited to, for `from=`, `gen=`, `hook=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Writer {
    Upstream(InstanceId, Generation),
    Hook {
        hook: HookId,
        kind: HookKind,
        generation: Option<Generation>,
        instance: InstanceId,
    },
}

/// The pipes the loop reads: each instance's service's and hooks' stdout
/// and stderr. Made on first use.
#[derive(Default)]
pub(super) struct Outputs {
    /// By instance number - 1.
    instances: Vec<InstancePipes>,
    /// Instances a reload removed (or whose number it gave to another)
    /// whose pipes are still open: closed once nothing of them is left.
    closing: Vec<InstanceId>,
    /// Some pipe used up its reads for the turn and may hold more.
    pub(super) more: bool,
}

/// One instance's pipes, and the instance name they were made for.
#[derive(Default)]
struct InstancePipes {
    service: SourcePipes,
    hook: SourcePipes,
    made_for: Option<String>,
}

impl InstancePipes {
    fn source(&self, source: Source) -> &SourcePipes {
        match source {
            Source::Service(_) => &self.service,
            Source::Hook(_) => &self.hook,
        }
    }

    fn source_mut(&mut self, source: Source) -> &mut SourcePipes {
        match source {
            Source::Service(_) => &mut self.service,
            Source::Hook(_) => &mut self.hook,
        }
    }

    fn open_pipes(&self) -> usize {
        [&self.service, &self.hook]
            .iter()
            .map(|pipes| pipes.pipes.iter().flatten().count())
            .sum()
    }
}

/// One source's stdout and stderr, and who writes to them now.
#[derive(Default)]
struct SourcePipes {
    pipes: [Option<OutputPipe>; 2],
    writer: Option<Writer>,
}

struct OutputPipe {
    read: File,
    /// Kept open so the pipe never ends while a child might still be given
    /// it; each spawn gets a copy.
    write: OwnedFd,
    lines: LineSplitter,
}

impl Outputs {
    fn source(&self, source: Source) -> Option<&SourcePipes> {
        self.instances
            .get(source.instance().index())
            .map(|inst| inst.source(source))
    }

    fn instance_mut(&mut self, instance: InstanceId) -> &mut InstancePipes {
        let i = instance.index();
        if self.instances.len() <= i {
            self.instances.resize_with(i + 1, InstancePipes::default);
        }
        &mut self.instances[i]
    }

    fn source_mut(&mut self, source: Source) -> &mut SourcePipes {
        self.instance_mut(source.instance()).source_mut(source)
    }

    fn pipe_mut(&mut self, pipe: PipeId) -> Option<&mut OutputPipe> {
        let PipeId(source, n) = pipe;
        self.instances
            .get_mut(source.instance().index())?
            .source_mut(source)
            .pipes
            .get_mut(n)?
            .as_mut()
    }

    fn writer(&self, source: Source) -> Option<Writer> {
        self.source(source).and_then(|pipes| pipes.writer)
    }

    /// Whether the pipe `id` exists.
    fn exists(&self, id: PipeId) -> bool {
        self.source(id.0)
            .and_then(|pipes| pipes.pipes.get(id.1))
            .is_some_and(Option::is_some)
    }
}

impl PipeId {
    /// The poll token its read end is registered under.
    fn token(self) -> Option<Token> {
        let PipeId(source, n) = self;
        let kind = match (source, n) {
            (Source::Service(_), 0) => service::TokenKind::Stdout,
            (Source::Service(_), _) => service::TokenKind::Stderr,
            (Source::Hook(_), 0) => service::TokenKind::HookStdout,
            (Source::Hook(_), _) => service::TokenKind::HookStderr,
        };
        service::token(source.instance(), kind)
    }
}

impl Shell {
    /// Copies of the write ends of `source`'s stdout and stderr, for a
    /// child about to be spawned; the pipes are made on first use.
    pub(super) fn output_writers(&mut self, source: Source) -> io::Result<[OwnedFd; 2]> {
        Ok([
            self.output_writer(PipeId(source, 0))?,
            self.output_writer(PipeId(source, 1))?,
        ])
    }

    fn output_writer(&mut self, id: PipeId) -> io::Result<OwnedFd> {
        if self.outputs.pipe_mut(id).is_none() {
            let token = id
                .token()
                .ok_or_else(|| io::Error::other("no poll token left for an output pipe"))?;
            let (read, write) = sys::output_pipe()?;
            let raw = read.as_raw_fd();
            self.poll
                .registry()
                .register(&mut SourceFd(&raw), token, Interest::READABLE)?;
            // Held while the instance is listed: the descriptor budget
            // counts them.
            self.fds.opened_for_good(2);
            let instance = id.0.instance();
            if self.outputs.instance_mut(instance).made_for.is_none() {
                let made_for = self.core.instance_name(instance).map(str::to_owned);
                self.outputs.instance_mut(instance).made_for = made_for;
            }
            self.outputs.source_mut(id.0).pipes[id.1] = Some(OutputPipe {
                read: File::from(read),
                write,
                lines: LineSplitter::default(),
            });
        }
        match self.outputs.pipe_mut(id) {
            Some(pipe) => pipe.write.try_clone(),
            None => Err(io::Error::other("output pipe missing")),
        }
    }

    /// From now on `source`'s lines are `writer`'s. What the one before
    /// left in the pipes is read and credited to it first.
    pub(super) fn output_from(&mut self, source: Source, writer: Writer) {
        self.output_done(source);
        self.outputs.source_mut(source).writer = Some(writer);
    }

    /// `source`'s writer exited: what it wrote is read now (so it is
    /// logged before its exit is), a last line without a newline included.
    pub(super) fn output_done(&mut self, source: Source) {
        for n in 0..2 {
            let id = PipeId(source, n);
            for _ in 0..READS_AT_EXIT {
                if !self.read_output(id) {
                    break;
                }
            }
            let writer = self.outputs.writer(source);
            if let Some(pipe) = self.outputs.pipe_mut(id) {
                let logger = &mut self.logger;
                pipe.lines
                    .finish(&mut |line, cut| log_output(logger, writer, line, cut));
            }
        }
    }

    /// An output pipe turned readable.
    pub(super) fn output_ready(&mut self, pipe: PipeId) {
        if self.read_output(pipe) {
            self.outputs.more = true;
        }
    }

    /// Reads every pipe (after a turn that left some unread), in place.
    pub(super) fn read_outputs(&mut self) {
        self.outputs.more = false;
        for i in 0..self.outputs.instances.len() {
            let instance = InstanceId::at(i);
            for source in [Source::Service(instance), Source::Hook(instance)] {
                for n in 0..2 {
                    let id = PipeId(source, n);
                    if self.outputs.exists(id) && self.read_output(id) {
                        self.outputs.more = true;
                    }
                }
            }
        }
    }

    /// After a reload: every instance with pipes open that the core lists
    /// no more, or lists as removed, or under another name, waits for its
    /// pipes to be closed.
    pub(super) fn outputs_reloaded(&mut self) {
        for i in 0..self.outputs.instances.len() {
            let instance = InstanceId::at(i);
            let kept =
                self.core.instance_service(instance).is_some() && self.listed_as_made(instance);
            if self.outputs.instances[i].open_pipes() > 0
                && !kept
                && !self.outputs.closing.contains(&instance)
            {
                self.outputs.closing.push(instance);
            }
        }
        self.close_outputs();
    }

    /// Whether the core still lists `instance` under the name its pipes
    /// were made for.
    fn listed_as_made(&self, instance: InstanceId) -> bool {
        self.outputs
            .instances
            .get(instance.index())
            .is_some_and(|inst| self.core.instance_name(instance) == inst.made_for.as_deref())
    }

    /// Closes the pipes of the instances waiting for it whose time came:
    /// the core lists them no more (or under another name), their last
    /// leader is reaped and no hook of theirs runs. What is left in them is
    /// read and logged first. A turn with none waiting costs nothing.
    pub(super) fn close_outputs(&mut self) {
        let mut k = 0;
        while let Some(&instance) = self.outputs.closing.get(k) {
            let i = instance.index();
            let gone = !self.listed_as_made(instance);
            if !gone && self.core.instance_service(instance).is_some() {
                // A later reload took it back under the same name: kept.
                self.outputs.closing.swap_remove(k);
                continue;
            }
            if !gone || self.service_leader_unreaped(instance) || self.hook_runs_for(instance) {
                k += 1;
                continue;
            }
            self.outputs.closing.swap_remove(k);
            self.output_done(Source::Service(instance));
            self.output_done(Source::Hook(instance));
            let Some(inst) = self.outputs.instances.get_mut(i) else {
                continue;
            };
            let closed = std::mem::take(inst);
            let mut count = 0;
            for pipe in [closed.service.pipes, closed.hook.pipes]
                .into_iter()
                .flatten()
                .flatten()
            {
                let raw = pipe.read.as_raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
                count += 2;
            }
            self.fds.closed_for_good(count);
            if let Some(line) = self.logger.line(LogLevel::Debug, "output_closed") {
                line.field("instance", instance).field("fds", count);
            }
        }
    }

    /// Reads the pipe `id` up to [`READS_PER_TURN`] times, logging each
    /// line. Returns whether more may be waiting.
    fn read_output(&mut self, id: PipeId) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        let writer = self.outputs.writer(id.0);
        let mut lines = 0;
        for _ in 0..READS_PER_TURN {
            if lines >= LINES_PER_TURN {
                break;
            }
            let Some(pipe) = self.outputs.pipe_mut(id) else {
                return false;
            };
            let error = match pipe.read.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let logger = &mut self.logger;
                    pipe.lines.feed(&buf[..n], &mut |line, cut| {
                        lines += 1;
                        log_output(logger, writer, line, cut);
                    });
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // We hold a write end, so the pipe cannot end; if it somehow
                // does, or fails, it is dropped and made anew on next use.
                Ok(_) => io::Error::new(io::ErrorKind::UnexpectedEof, "pipe ended"),
                Err(e) => e,
            };
            if let Some(line) = self.logger.line(LogLevel::Warn, "output_failed") {
                line.field("error", error);
            }
            if let Some(pipe) = self.outputs.source_mut(id.0).pipes[id.1].take() {
                let raw = pipe.read.as_raw_fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            }
            return false;
        }
        true
    }
}

/// `level=info event=output from=upstream|on-activate|on-timeout gen=N
/// [hook=H] instance=I line="..."`, with `truncated=true` for a line cut at [`MAX_LINE`].
fn log_output(logger: &mut super::Logger, writer: Option<Writer>, bytes: &[u8], cut: bool) {
    let Some(line) = logger.line(LogLevel::Info, "output") else {
        return;
    };
    let line = match writer {
        Some(Writer::Upstream(instance, generation)) => line
            .field("from", "upstream")
            .field("gen", generation)
            .field("instance", instance),
        Some(Writer::Hook {
            hook,
            kind,
            generation,
            instance,
        }) => line
            .field(
                "from",
                match kind {
                    HookKind::Activate => "on-activate",
                    HookKind::Timeout => "on-timeout",
                },
            )
            .field_opt("gen", generation)
            .field("hook", hook)
            .field("instance", instance),
        None => line,
    };
    let line = line.field("line", String::from_utf8_lossy(bytes));
    if cut {
        line.field("truncated", true);
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

    /// The writer is done: a last line without a newline is a line too.
    pub(super) fn finish(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.cutting && !self.partial.is_empty() {
            emit(&self.partial, false);
        }
        self.partial = Vec::new();
        self.cutting = false;
    }
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
        let lengths: Vec<usize> = lines.iter().map(|l| l.0.len()).collect();
        assert_eq!(lines.len(), 3, "{lengths:?}");
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
}
