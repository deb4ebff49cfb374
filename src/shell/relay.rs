//! Pumping bytes between the two sockets of a proxying connection.
//!
//! Copying mode reads into one scratch buffer shared by the whole loop and
//! writes straight on; only bytes the destination would not take are kept, in a
//! buffer of `--buffer-size` taken from the pool and given back as soon as it
//! drains. An idle proxying connection therefore holds no buffer at all, and a
//! busy one at most one per direction. A splicing direction takes a pipe from
//! the pool when it has bytes to move and gives it back once empty, and the
//! bytes never leave the kernel. With `--splice auto` a direction splices once
//! one read has filled the whole scratch buffer: a stream that big is worth the
//! pipe, while the small reads of a request/response exchange are cheaper
//! copied.
//!
//! The sockets are registered edge-triggered for both readiness kinds once and
//! never re-registered: backpressure is simply not reading a side whose held
//! bytes are at the limit. The kernel's socket buffers fill, TCP flow control
//! slows the sender, and reading resumes in the same pump call that makes room,
//! so no readiness edge is ever needed that the kernel will not send.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;

use mio::net::TcpStream;

use crate::config::Splice;
use crate::core::{EndedBy, RelayCause, RelayEnd};
use crate::shell::buffer::{BufferPool, RelayBuffer};
use crate::sys::{self, Pipe};

/// How many read-or-write rounds one direction gets per pump call. A busy
/// connection yields after this so timers, accepts and other connections get
/// their turn; the loop comes back to it without waiting for a readiness edge.
const ROUNDS_PER_PUMP: usize = 64;

/// Idle buffers and pipes kept for reuse beyond those in use.
const IDLE_CHANNELS: usize = 16;

/// Where relay memory comes from and goes back to.
pub struct ChannelPool {
    buffers: BufferPool,
    /// Every read in copying mode lands here first.
    scratch: Box<[u8]>,
    splice: Splice,
    /// Empty pipes ready for reuse, with their capacity.
    pipes: Vec<(Pipe, usize)>,
    /// The kernel or a sandbox refused splice: copy from now on.
    splice_refused: bool,
    /// The refusal, until the shell has logged it.
    refusal: Option<io::Error>,
}

impl ChannelPool {
    pub fn new(buffer_size: usize, splice: Splice) -> Self {
        ChannelPool {
            buffers: BufferPool::new(buffer_size, IDLE_CHANNELS),
            scratch: vec![0; buffer_size].into_boxed_slice(),
            splice,
            pipes: Vec::new(),
            splice_refused: false,
            refusal: None,
        }
    }

    /// Applies a reloaded buffer size and relay mode to connections from now on.
    pub fn reconfigure(&mut self, buffer_size: usize, splice: Splice) {
        if buffer_size != self.buffers.buffer_capacity() {
            self.buffers.set_buffer_capacity(buffer_size);
            self.scratch = vec![0; buffer_size].into_boxed_slice();
            self.pipes.clear();
        }
        self.splice = splice;
        if !self.splices() {
            self.pipes.clear();
        }
    }

    /// Whether pipes are wanted at all: splicing is configured and was never
    /// refused.
    fn splices(&self) -> bool {
        self.splice != Splice::Off && !self.splice_refused
    }

    /// An empty pipe for a direction about to read, if it should splice.
    /// `None` means copy instead: splicing is off, or not yet earned by a
    /// `streaming` direction in auto mode, or no pipe can be had (out of
    /// descriptors, say), which copying does not need.
    fn take_pipe(&mut self, streaming: bool) -> Option<Held> {
        let earned = self.splice == Splice::On || streaming;
        if !earned || !self.splices() {
            return None;
        }
        let (pipe, capacity) = match self.pipes.pop() {
            Some(idle) => idle,
            None => Pipe::with_capacity(self.buffers.buffer_capacity()).ok()?,
        };
        Some(Held::Pipe {
            pipe,
            capacity,
            len: 0,
        })
    }

    /// Closes the idle pipes kept for reuse; says whether there were any. Out
    /// of descriptors, a client or an upstream needs them more than the pool.
    pub fn drop_idle_pipes(&mut self) -> bool {
        let had_any = !self.pipes.is_empty();
        self.pipes.clear();
        had_any
    }

    /// Descriptors held by the idle pipes kept for reuse.
    pub fn idle_pipe_fds(&self) -> usize {
        self.pipes.len() * 2
    }

    /// Stops splicing for good after the first refusal. A refusal met with
    /// an empty pipe loses nothing and copying takes over; one met with bytes
    /// in the pipe fails that connection (`relay_error`) and only the next
    /// ones copy.
    fn refuse_splice(&mut self, error: io::Error) {
        self.splice_refused = true;
        self.pipes.clear();
        self.refusal = Some(error);
    }

    /// The refusal that turned splicing off, once, for the log.
    pub fn take_splice_refusal(&mut self) -> Option<io::Error> {
        self.refusal.take()
    }

    fn give_back(&mut self, held: Held) {
        match held {
            Held::Nothing => {}
            Held::Buffer(buf) => self.buffers.give_back(buf),
            // A pipe still holding bytes cannot be emptied cheaply: close it.
            Held::Pipe {
                pipe,
                capacity,
                len,
            } => {
                if len == 0 && self.splices() && self.pipes.len() < IDLE_CHANNELS {
                    self.pipes.push((pipe, capacity));
                }
            }
        }
    }
}

/// The relay state of one proxying connection. The client socket and its
/// readiness stay with the shell, which had them before relaying began.
pub struct Relay {
    pub upstream: TcpStream,
    upstream_ready: Readiness,
    /// Client to upstream.
    up: Direction,
    /// Upstream to client.
    down: Direction,
    /// On the shell's busy list, waiting for its next turn: a relay pumped
    /// from a readiness event while it waits there must not be listed twice.
    pub scheduled: bool,
    /// The side that sent end of stream or failed first, once one did.
    ended_by: Option<EndedBy>,
    /// When a pump last moved a byte (or relaying began), for the
    /// stalled-queue check; the shell stores it, the core asks for it.
    pub last_active: u64,
    /// When relaying began (the activation), for the connection duration
    /// metric.
    pub started: u64,
    /// Bytes of a PROXY protocol header put ahead of the client's: written
    /// upstream but not the client's, so not counted as relayed.
    header_len: u16,
}

/// What a socket may do without blocking, as far as we know, tracked from the
/// moment it is registered: epoll reports the state at registration and every
/// change after it, once each (edge-triggered), so nothing is missed. Set by
/// readiness events; cleared by `WouldBlock`, or by a short read while no
/// event has said the peer is closing.
#[derive(Clone, Copy, Default)]
pub struct Readiness {
    readable: bool,
    writable: bool,
    /// An event said the peer closed or the socket failed. Until then a read
    /// that returns less than asked has emptied the socket, since later bytes
    /// bring a new event; after it, end of stream or an error waits behind
    /// the bytes and only another read reports it.
    closing: bool,
}

impl Readiness {
    /// Records one readiness event.
    pub fn note(&mut self, event: SocketEvent) {
        self.readable |= event.readable;
        self.writable |= event.writable;
        self.closing |= event.closing;
    }

    /// An event said the peer closed or the socket failed.
    pub fn closing(&self) -> bool {
        self.closing
    }
}

/// What one readiness event said about one socket. A closed or failed socket
/// counts as readable and writable: the next read or write says how it ended.
#[derive(Clone, Copy)]
pub struct SocketEvent {
    pub readable: bool,
    pub writable: bool,
    /// The peer closed or the socket failed.
    pub closing: bool,
}

impl SocketEvent {
    pub fn of(event: &mio::event::Event) -> Self {
        let closing = event.is_read_closed() || event.is_write_closed() || event.is_error();
        SocketEvent {
            readable: event.is_readable() || closing,
            writable: event.is_writable() || closing,
            closing,
        }
    }
}

struct Direction {
    held: Held,
    /// The source sent end of stream.
    eof: bool,
    /// End of stream was passed on to the destination.
    shut: bool,
    /// A read has filled the whole scratch buffer: `--splice auto` splices
    /// this direction from now on.
    streaming: bool,
    bytes: u64,
}

/// Bytes read from one side and not yet written to the other.
enum Held {
    /// Copying mode with everything written.
    Nothing,
    /// Copying mode: what the destination would not take yet.
    Buffer(RelayBuffer),
    /// Splice mode: the pipe and how many bytes sit in it.
    Pipe {
        pipe: Pipe,
        capacity: usize,
        len: usize,
    },
}

/// Where a pump call left the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum Pumped {
    /// Waiting for readiness.
    Idle,
    /// Still has work it did not get to this turn.
    Busy,
    /// Both directions are finished, or one side failed.
    Ended(RelayEnd),
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn ended_by(self) -> EndedBy {
        match self {
            Side::Client => EndedBy::Client,
            Side::Upstream => EndedBy::Upstream,
        }
    }
}

/// What the rounds of one direction's pump call did and learned.
struct Round {
    progressed: bool,
    src_blocked: bool,
    /// See [`Readiness::closing`]: a short read proves nothing while set.
    src_closing: bool,
    dst_blocked: bool,
}

impl Relay {
    /// Starts relaying over a connected upstream whose readiness was tracked
    /// since it was registered, at `now`.
    ///
    /// A `header` (`--send-proxy`) is held as the first bytes for the
    /// upstream: the client direction drains it before it reads anything, so
    /// a short write never lets a client byte overtake it.
    pub fn new(
        upstream: TcpStream,
        upstream_ready: Readiness,
        header: Option<&[u8]>,
        pool: &mut ChannelPool,
        now: u64,
    ) -> Self {
        let mut up = Direction::new();
        let mut header_len = 0;
        if let Some(header) = header.filter(|h| !h.is_empty()) {
            let mut buf = pool.buffers.take();
            // A header is at most 107 bytes; a buffer at least 1 KiB.
            let n = header.len().min(buf.space().len());
            buf.space()[..n].copy_from_slice(&header[..n]);
            buf.commit(n);
            up.held = Held::Buffer(buf);
            header_len = u16::try_from(n).unwrap_or(u16::MAX);
        }
        Relay {
            upstream,
            upstream_ready,
            up,
            down: Direction::new(),
            scheduled: false,
            ended_by: None,
            last_active: now,
            started: now,
            header_len,
        }
    }

    /// Records a readiness event for the upstream socket.
    pub fn note_upstream_ready(&mut self, event: SocketEvent) {
        self.upstream_ready.note(event);
    }

    /// Bytes relayed client → upstream and upstream → client.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.bytes.saturating_sub(u64::from(self.header_len)),
            self.down.bytes,
        )
    }

    /// Descriptors of the pipes its directions splice through.
    pub fn pipe_fds(&self) -> usize {
        [&self.up, &self.down]
            .iter()
            .filter(|d| matches!(d.held, Held::Pipe { .. }))
            .count()
            * 2
    }

    /// Returns what the directions hold to the pool.
    pub fn release(self, pool: &mut ChannelPool) {
        pool.give_back(self.up.held);
        pool.give_back(self.down.held);
    }

    /// Moves what can be moved in both directions without blocking.
    pub fn pump(
        &mut self,
        client: &TcpStream,
        client_ready: &mut Readiness,
        pool: &mut ChannelPool,
    ) -> Pumped {
        let up = self.up.pump(
            client,
            &self.upstream,
            client_ready,
            &mut self.upstream_ready.writable,
            pool,
        );
        self.note_end(&up, self.up.eof, Side::Client, Side::Upstream);
        let down = self.down.pump(
            &self.upstream,
            client,
            &mut self.upstream_ready,
            &mut client_ready.writable,
            pool,
        );
        self.note_end(&down, self.down.eof, Side::Upstream, Side::Client);
        let ended_by = self.ended_by.unwrap_or(EndedBy::Tcplock);
        let busy = match (up, down) {
            (Err(side), _) => {
                self.reset_both(client);
                return Pumped::Ended(side.into_end(Side::Client, Side::Upstream, ended_by));
            }
            (_, Err(side)) => {
                self.reset_both(client);
                return Pumped::Ended(side.into_end(Side::Upstream, Side::Client, ended_by));
            }
            (Ok(up_busy), Ok(down_busy)) => up_busy || down_busy,
        };
        let up_done = self.up.eof && self.up.held.is_empty();
        let down_done = self.down.eof && self.down.held.is_empty();
        if up_done && down_done {
            // Closing both sockets sends the last end of stream; a shutdown
            // call for it would be one syscall too many.
            return Pumped::Ended(RelayEnd {
                cause: RelayCause::Finished,
                ended_by,
            });
        }
        // Half-close: the peer sees end of stream and can still answer. A peer
        // that is already gone shows up as an error on the next read or write,
        // so a failed shutdown needs no handling of its own.
        if up_done && !self.up.shut {
            self.up.shut = true;
            let _ = self.upstream.shutdown(Shutdown::Write);
        }
        if down_done && !self.down.shut {
            self.down.shut = true;
            let _ = client.shutdown(Shutdown::Write);
        }
        if busy { Pumped::Busy } else { Pumped::Idle }
    }

    /// Remembers the first side to end: the source of a direction that saw
    /// end of stream, or whichever end of it failed. Within one pump call the
    /// client → upstream direction goes first, so it wins a tie.
    fn note_end(
        &mut self,
        pumped: &Result<bool, Failed>,
        eof: bool,
        source: Side,
        destination: Side,
    ) {
        if self.ended_by.is_some() {
            return;
        }
        self.ended_by = match pumped {
            Err(Failed::Source | Failed::SpliceRefused(_)) => Some(source.ended_by()),
            Err(Failed::Destination) => Some(destination.ended_by()),
            Err(Failed::Relay) => Some(EndedBy::Tcplock),
            Ok(_) if eof => Some(source.ended_by()),
            Ok(_) => None,
        };
    }

    /// A failed relay ends both sides with a reset when their sockets close:
    /// the peer that is still there must see an error, not a clean end of
    /// stream that would pass a truncated stream off as complete. The side
    /// that failed is gone already, so setting it there too costs nothing and
    /// spares knowing which one it was. A socket that refuses the option is
    /// closed normally: there is nothing better left to do with it.
    fn reset_both(&self, client: &TcpStream) {
        let _ = sys::set_reset_on_close(client.as_fd());
        let _ = sys::set_reset_on_close(self.upstream.as_fd());
    }
}

/// Which end of a direction failed.
enum Failed {
    Source,
    Destination,
    /// Splicing from the source was refused; nothing was moved.
    SpliceRefused(io::Error),
    /// Splicing was refused while the pipe held bytes: copying cannot take
    /// over behind them, and neither peer is to blame.
    Relay,
}

impl Failed {
    fn into_end(self, source: Side, destination: Side, ended_by: EndedBy) -> RelayEnd {
        let side = match self {
            Failed::Source | Failed::SpliceRefused(_) => Some(source),
            Failed::Destination => Some(destination),
            Failed::Relay => None,
        };
        let cause = match side {
            Some(Side::Client) => RelayCause::ClientError,
            Some(Side::Upstream) => RelayCause::UpstreamError,
            None => RelayCause::RelayError,
        };
        RelayEnd { cause, ended_by }
    }
}

impl Direction {
    fn new() -> Self {
        Direction {
            held: Held::Nothing,
            eof: false,
            shut: false,
            streaming: false,
            bytes: 0,
        }
    }

    /// Reads from `src` and writes to `dst` until both would block. `Ok(true)`
    /// means the round budget ran out first. The readiness flags say which
    /// side is worth trying and learn which one blocked.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        src_ready: &mut Readiness,
        dst_writable: &mut bool,
        pool: &mut ChannelPool,
    ) -> Result<bool, Failed> {
        let mut state = Round {
            progressed: false,
            src_blocked: !src_ready.readable,
            src_closing: src_ready.closing,
            dst_blocked: !*dst_writable,
        };
        let mut busy = true;
        for _ in 0..ROUNDS_PER_PUMP {
            state.progressed = false;
            if matches!(self.held, Held::Nothing)
                && !self.eof
                && !state.src_blocked
                && let Some(pipe) = pool.take_pipe(self.streaming)
            {
                self.held = pipe;
            }
            match &mut self.held {
                Held::Nothing => self.copy_through(src, dst, pool, &mut state)?,
                Held::Buffer(_) => self.drain_buffer(src, dst, pool, &mut state)?,
                Held::Pipe { .. } => match self.splice_round(src, dst, pool, &mut state) {
                    Err(Failed::SpliceRefused(error)) => {
                        // The pipe is empty: drop it and copy this round.
                        self.held = Held::Nothing;
                        pool.refuse_splice(error);
                        state.progressed = true;
                    }
                    other => other?,
                },
            }
            if !state.progressed {
                busy = false;
                break;
            }
        }
        src_ready.readable = !state.src_blocked;
        *dst_writable = !state.dst_blocked;
        Ok(busy)
    }

    /// Nothing held: read into the scratch buffer and write straight on; keep
    /// only what the destination refused.
    fn copy_through(
        &mut self,
        mut src: &TcpStream,
        mut dst: &TcpStream,
        pool: &mut ChannelPool,
        state: &mut Round,
    ) -> Result<(), Failed> {
        if self.eof || state.src_blocked {
            return Ok(());
        }
        let asked = pool.scratch.len();
        let Some(n) = read_with(|| src.read(&mut pool.scratch), &mut self.eof, state, true)? else {
            return Ok(());
        };
        state.note_short_read(n, asked);
        self.streaming |= n == asked;
        let written = if state.dst_blocked {
            0
        } else {
            write_with(|| dst.write(&pool.scratch[..n]))?
        };
        self.bytes += written as u64;
        if written < n {
            // The destination is full: keep the rest until it drains.
            state.dst_blocked = true;
            let mut buf = pool.buffers.take();
            let rest = &pool.scratch[written..n];
            buf.space()[..rest.len()].copy_from_slice(rest);
            buf.commit(rest.len());
            self.held = Held::Buffer(buf);
        }
        Ok(())
    }

    /// Bytes held from before: write them first, top the buffer up while there
    /// is room, and hand it back once it is empty.
    fn drain_buffer(
        &mut self,
        mut src: &TcpStream,
        mut dst: &TcpStream,
        pool: &mut ChannelPool,
        state: &mut Round,
    ) -> Result<(), Failed> {
        let Held::Buffer(buf) = &mut self.held else {
            return Ok(());
        };
        if !state.dst_blocked {
            let written = write_with(|| dst.write(buf.data()))?;
            if written == 0 {
                state.dst_blocked = true;
            } else {
                buf.consume(written);
                self.bytes += written as u64;
                state.progressed = true;
            }
        }
        if buf.is_empty() {
            if let Held::Buffer(buf) = std::mem::replace(&mut self.held, Held::Nothing) {
                pool.buffers.give_back(buf);
            }
            return Ok(());
        }
        if !self.eof && !state.src_blocked && !buf.is_full() {
            let asked = buf.space().len();
            if let Some(n) = read_with(|| src.read(buf.space()), &mut self.eof, state, true)? {
                buf.commit(n);
                state.note_short_read(n, asked);
            }
        }
        Ok(())
    }

    /// Splice mode: socket → pipe → socket; an emptied pipe goes back to the
    /// pool, so an idle connection holds none.
    fn splice_round(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        pool: &mut ChannelPool,
        state: &mut Round,
    ) -> Result<(), Failed> {
        let Held::Pipe {
            pipe,
            capacity,
            len,
        } = &mut self.held
        else {
            return Ok(());
        };
        if !self.eof && !state.src_blocked && *len < *capacity {
            // A pipe is full by pages, not bytes: with bytes in it, EAGAIN may
            // mean "pipe full" rather than "socket empty", so only an empty
            // pipe proves the socket has nothing to give.
            let empty = *len == 0;
            let room = *capacity - *len;
            let filled = match read_with(
                || pipe.fill_from(src.as_fd(), room),
                &mut self.eof,
                state,
                empty,
            ) {
                // Copying cannot take over while the pipe holds bytes
                // ahead of the socket's: fail the connection instead, and
                // copy from the next connection on.
                Err(Failed::SpliceRefused(error)) if !empty => {
                    pool.refuse_splice(error);
                    return Err(Failed::Relay);
                }
                other => other?,
            };
            if let Some(n) = filled {
                *len += n;
            }
        }
        if *len > 0 && !state.dst_blocked {
            let moved = match write_with(|| pipe.drain_to(dst.as_fd(), *len)) {
                // The bytes are stuck in the pipe, as above.
                Err(Failed::SpliceRefused(error)) => {
                    pool.refuse_splice(error);
                    return Err(Failed::Relay);
                }
                other => other?,
            };
            if moved == 0 {
                state.dst_blocked = true;
            } else {
                *len -= moved;
                self.bytes += moved as u64;
                state.progressed = true;
            }
        }
        if *len == 0 {
            pool.give_back(std::mem::replace(&mut self.held, Held::Nothing));
        }
        Ok(())
    }
}

impl Round {
    /// A copying read that got less than it asked for emptied the socket,
    /// unless end of stream or an error may be queued behind the bytes. A
    /// splice is never judged so: it stops short when the pipe runs out of
    /// page slots too.
    fn note_short_read(&mut self, got: usize, asked: usize) {
        if got < asked && !self.src_closing {
            self.src_blocked = true;
        }
    }
}

impl Held {
    fn is_empty(&self) -> bool {
        match self {
            Held::Nothing => true,
            Held::Buffer(buf) => buf.is_empty(),
            Held::Pipe { len, .. } => *len == 0,
        }
    }
}

/// One read into a direction's channel: the byte count, or `None` after end
/// of stream (recorded in `eof`) or `WouldBlock` (recorded as a blocked source
/// when `would_block_means_empty`). Any other error fails the source.
fn read_with(
    mut read: impl FnMut() -> io::Result<usize>,
    eof: &mut bool,
    state: &mut Round,
    would_block_means_empty: bool,
) -> Result<Option<usize>, Failed> {
    loop {
        match read() {
            Ok(0) => {
                *eof = true;
                state.progressed = true;
                return Ok(None);
            }
            Ok(n) => {
                state.progressed = true;
                return Ok(Some(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                state.src_blocked = would_block_means_empty;
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                return Err(Failed::SpliceRefused(e));
            }
            Err(_) => return Err(Failed::Source),
        }
    }
}

/// One write: how much the destination took (0 if it would block). Writing
/// nothing at all, or any error but a refused splice, fails the destination.
fn write_with(mut write: impl FnMut() -> io::Result<usize>) -> Result<usize, Failed> {
    loop {
        match write() {
            Ok(0) => return Err(Failed::Destination),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                return Err(Failed::SpliceRefused(e));
            }
            Err(_) => return Err(Failed::Destination),
        }
    }
}
