//! Pumping bytes between the two sockets of a proxying connection through two
//! bounded buffers.
//!
//! The sockets are registered edge-triggered for both readiness kinds once, when
//! relaying starts, and never re-registered: backpressure is simply not reading
//! a side whose buffer is full. The kernel's socket buffers fill, TCP flow
//! control slows the sender, and memory stays at two buffers per connection.
//! Reading resumes in the same pump call that makes room, so no readiness edge
//! is ever needed that the kernel will not send.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use crate::buffer::{BufferPool, RelayBuffer};
use crate::core::RelayEnd;

/// How many read-or-write rounds one direction gets per pump call. A busy
/// connection yields after this so timers, accepts and other connections get
/// their turn; the loop comes back to it without waiting for a readiness edge.
const ROUNDS_PER_PUMP: usize = 64;

/// The relay state of one proxying connection.
pub struct Relay {
    pub upstream: TcpStream,
    /// Client to upstream.
    up: Direction,
    /// Upstream to client.
    down: Direction,
}

struct Direction {
    buf: RelayBuffer,
    /// The source sent end of stream.
    eof: bool,
    /// End of stream was passed on to the destination.
    shut: bool,
    bytes: u64,
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
    pub fn new(upstream: TcpStream, pool: &mut BufferPool) -> Self {
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

    /// Returns the buffers to the pool.
    pub fn release(self, pool: &mut BufferPool) {
        pool.give_back(self.up.buf);
        pool.give_back(self.down.buf);
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
    fn new(buf: RelayBuffer) -> Self {
        Direction {
            buf,
            eof: false,
            shut: false,
            bytes: 0,
        }
    }

    /// Reads from `src` and writes to `dst` until both would block (or the
    /// round budget is spent: `Ok(true)`). `Err` names the side that failed.
    fn pump(
        &mut self,
        mut src: &TcpStream,
        mut dst: &TcpStream,
        src_side: Side,
        dst_side: Side,
    ) -> Result<bool, Side> {
        let mut src_blocked = false;
        let mut dst_blocked = false;
        for _ in 0..ROUNDS_PER_PUMP {
            let mut progressed = false;
            if !self.eof && !src_blocked && !self.buf.is_full() {
                match src.read(self.buf.space()) {
                    Ok(0) => {
                        self.eof = true;
                        progressed = true;
                    }
                    Ok(n) => {
                        self.buf.commit(n);
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => src_blocked = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(_) => return Err(src_side),
                }
            }
            if !self.buf.is_empty() && !dst_blocked {
                match dst.write(self.buf.data()) {
                    Ok(0) => return Err(dst_side),
                    Ok(n) => {
                        self.buf.consume(n);
                        self.bytes += n as u64;
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst_blocked = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progressed = true,
                    Err(_) => return Err(dst_side),
                }
            }
            if self.eof && self.buf.is_empty() && !self.shut {
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
