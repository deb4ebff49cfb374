//! Pumping bytes between the two sockets of a proxying connection through two
//! bounded channels: a fixed user-space buffer each way, or with `--splice on`
//! a pipe each way that keeps the bytes inside the kernel.
//!
//! The sockets are registered edge-triggered for both readiness kinds once and
//! never re-registered: backpressure is simply not reading a side whose channel
//! is full. The kernel's socket buffers fill, TCP flow control slows the sender,
//! and memory stays at two channels per connection. Reading resumes in the same
//! pump call that makes room, so no readiness edge is ever needed that the
//! kernel will not send.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;

use mio::net::TcpStream;

use crate::buffer::{BufferPool, RelayBuffer};
use crate::core::RelayEnd;
use crate::sys::Pipe;

/// How many read-or-write rounds one direction gets per pump call. A busy
/// connection yields after this so timers, accepts and other connections get
/// their turn; the loop comes back to it without waiting for a readiness edge.
const ROUNDS_PER_PUMP: usize = 64;

/// Idle channels kept for reuse beyond those in use.
const IDLE_CHANNELS: usize = 16;

/// Where relay channels come from and go back to.
pub struct ChannelPool {
    buffers: BufferPool,
    splice: bool,
    /// Empty pipes ready for reuse, with their capacity.
    pipes: Vec<(Pipe, usize)>,
}

impl ChannelPool {
    pub fn new(buffer_size: usize, splice: bool) -> Self {
        ChannelPool {
            buffers: BufferPool::new(buffer_size, IDLE_CHANNELS),
            splice,
            pipes: Vec::new(),
        }
    }

    /// Applies a reloaded buffer size and relay mode to connections from now on.
    pub fn reconfigure(&mut self, buffer_size: usize, splice: bool) {
        if buffer_size != self.buffers.buffer_capacity() {
            self.buffers.set_buffer_capacity(buffer_size);
            self.pipes.clear();
        }
        self.splice = splice;
    }

    fn take(&mut self) -> Channel {
        if self.splice {
            if let Some((pipe, capacity)) = self.pipes.pop() {
                return Channel::Pipe {
                    pipe,
                    capacity,
                    len: 0,
                };
            }
            // Without a pipe (out of descriptors, say) the copying relay still works.
            if let Ok((pipe, capacity)) = Pipe::with_capacity(self.buffers.buffer_capacity()) {
                return Channel::Pipe {
                    pipe,
                    capacity,
                    len: 0,
                };
            }
        }
        Channel::Buffer(self.buffers.take())
    }

    fn give_back(&mut self, channel: Channel) {
        match channel {
            Channel::Buffer(buf) => self.buffers.give_back(buf),
            // A pipe still holding bytes cannot be emptied cheaply: close it.
            Channel::Pipe {
                pipe,
                capacity,
                len,
            } => {
                if len == 0 && self.splice && self.pipes.len() < IDLE_CHANNELS {
                    self.pipes.push((pipe, capacity));
                }
            }
        }
    }
}

/// The relay state of one proxying connection.
pub struct Relay {
    pub upstream: TcpStream,
    /// Client to upstream.
    up: Direction,
    /// Upstream to client.
    down: Direction,
}

struct Direction {
    channel: Channel,
    /// The source sent end of stream.
    eof: bool,
    /// End of stream was passed on to the destination.
    shut: bool,
    bytes: u64,
}

/// Bytes read from one side and not yet written to the other.
enum Channel {
    Buffer(RelayBuffer),
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

impl Relay {
    pub fn new(upstream: TcpStream, pool: &mut ChannelPool) -> Self {
        Relay {
            upstream,
            up: Direction::new(pool.take()),
            down: Direction::new(pool.take()),
        }
    }

    /// Bytes relayed client → upstream and upstream → client.
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }

    /// Returns the channels to the pool.
    pub fn release(self, pool: &mut ChannelPool) {
        pool.give_back(self.up.channel);
        pool.give_back(self.down.channel);
    }

    /// Moves what can be moved in both directions without blocking.
    pub fn pump(&mut self, client: &TcpStream) -> Pumped {
        let up = self
            .up
            .pump(client, &self.upstream, Side::Client, Side::Upstream);
        let down = self
            .down
            .pump(&self.upstream, client, Side::Upstream, Side::Client);
        match (up, down) {
            (Err(side), _) | (_, Err(side)) => Pumped::Ended(match side {
                Side::Client => RelayEnd::ClientError,
                Side::Upstream => RelayEnd::UpstreamError,
            }),
            _ if self.up.shut && self.down.shut => Pumped::Ended(RelayEnd::Finished),
            (Ok(true), _) | (_, Ok(true)) => Pumped::Busy,
            _ => Pumped::Idle,
        }
    }
}

impl Direction {
    fn new(channel: Channel) -> Self {
        Direction {
            channel,
            eof: false,
            shut: false,
            bytes: 0,
        }
    }

    /// Reads from `src` and writes to `dst` until both would block (or the
    /// round budget is spent: `Ok(true)`). `Err` names the side that failed.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> Result<bool, Side> {
        let mut src_blocked = false;
        let mut dst_blocked = false;
        for _ in 0..ROUNDS_PER_PUMP {
            let mut progressed = false;
            if !self.eof && !src_blocked && !self.channel.is_full() {
                match self.channel.fill(src) {
                    Ok(0) => {
                        self.eof = true;
                        progressed = true;
                    }
                    Ok(_) => progressed = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => src_blocked = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(_) => return Err(src_side),
                }
            }
            if !self.channel.is_empty() && !dst_blocked {
                match self.channel.drain(dst) {
                    Ok(0) => return Err(dst_side),
                    Ok(n) => {
                        self.bytes += n as u64;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst_blocked = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(_) => return Err(dst_side),
                }
            }
            if self.eof && self.channel.is_empty() && !self.shut {
                self.shut = true;
                // Half-close: the peer sees end of stream and can still answer.
                // A peer that is already gone shows up as an error on the next
                // read or write, so a failure here needs no handling of its own.
                let _ = dst.shutdown(Shutdown::Write);
            }
            if !progressed {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Channel {
    fn is_full(&self) -> bool {
        match self {
            Channel::Buffer(buf) => buf.is_full(),
            Channel::Pipe { capacity, len, .. } => len >= capacity,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Channel::Buffer(buf) => buf.is_empty(),
            Channel::Pipe { len, .. } => *len == 0,
        }
    }

    /// Reads from `src` into the free room; `Ok(0)` is end of stream.
    fn fill(&mut self, mut src: &TcpStream) -> io::Result<usize> {
        match self {
            Channel::Buffer(buf) => {
                let n = src.read(buf.space())?;
                buf.commit(n);
                Ok(n)
            }
            Channel::Pipe {
                pipe,
                capacity,
                len,
            } => {
                let n = pipe.fill_from(src.as_fd(), *capacity - *len)?;
                *len += n;
                Ok(n)
            }
        }
    }

    /// Writes what is held to `dst`.
    fn drain(&mut self, mut dst: &TcpStream) -> io::Result<usize> {
        match self {
            Channel::Buffer(buf) => {
                let n = dst.write(buf.data())?;
                buf.consume(n);
                Ok(n)
            }
            Channel::Pipe { pipe, len, .. } => {
                let n = pipe.drain_to(dst.as_fd(), *len)?;
                *len -= n;
                Ok(n)
            }
        }
    }
}
