//! Fixed-capacity relay buffers and the pool that recycles them.
//!
//! A proxying connection holds two [`RelayBuffer`]s (one per direction), taken
//! from a [`BufferPool`] when it starts relaying and given back when it ends.
//! Queued connections hold none. Buffers never grow, so steady-state relaying
//! allocates nothing, and the pool keeps only a bounded number of idle ones so
//! memory returns to the system after a burst.

use std::fmt;

/// A byte buffer of fixed capacity holding data read from one socket and not
/// yet written to the other.
///
/// Bytes live in `storage[start..end]`. Reads fill the free tail
/// ([`space`](Self::space) then [`commit`](Self::commit)); writes drain the
/// head ([`data`](Self::data) then [`consume`](Self::consume)).
///
/// Out-of-range counts passed to `consume` or `commit` are clamped to what the
/// buffer holds or has room for: a caller bug, but never a panic and never
/// exposure of stale bytes.
pub struct RelayBuffer {
    storage: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RelayBuffer {
    /// Allocates an empty buffer of exactly `capacity` bytes, zero-filled.
    ///
    /// A zero capacity is allowed; such a buffer is both empty and full.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            storage: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Total size of the storage, fixed for the life of the buffer.
    pub fn capacity(&self) -> usize {
        self.storage.len()
    }

    /// Number of bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when no byte is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// True when the buffer holds `capacity()` bytes, i.e. [`space`](Self::space)
    /// would be empty. A relay should stop reading into a full buffer.
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
    }

    /// The bytes waiting to be written, oldest first.
    pub fn data(&self) -> &[u8] {
        &self.storage[self.start..self.end]
    }

    /// Drops the first `n` bytes of [`data`](Self::data), after a write of `n`
    /// bytes. `n` above `len()` is clamped to `len()`.
    ///
    /// When the buffer becomes empty its read and write positions return to
    /// the front, so the whole capacity is free again without copying.
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.clear();
        }
    }

    /// The free room after the stored bytes, to read into.
    ///
    /// It is empty only when the buffer [`is_full`](Self::is_full): if the
    /// tail is exhausted but bytes were consumed from the front, the stored
    /// bytes are first moved to the front (one `copy_within` of at most
    /// `len()` bytes).
    pub fn space(&mut self) -> &mut [u8] {
        if self.end == self.capacity() && self.start > 0 {
            self.storage.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.storage[self.end..]
    }

    /// Marks the first `n` bytes of the last [`space`](Self::space) as data,
    /// after a read of `n` bytes into it. `n` above the free tail is clamped to
    /// it.
    pub fn commit(&mut self, n: usize) {
        self.end += n.min(self.capacity() - self.end);
    }

    /// Forgets all stored bytes.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

impl fmt::Debug for RelayBuffer {
    /// Shows positions, not contents: relayed bytes are not ours to log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayBuffer")
            .field("capacity", &self.capacity())
            .field("start", &self.start)
            .field("end", &self.end)
            .finish()
    }
}

/// Recycles [`RelayBuffer`]s of one capacity.
///
/// Buffers are allocated on demand by [`take`](Self::take); at most
/// `max_idle` returned buffers are kept for reuse and the rest are freed.
#[derive(Debug)]
pub struct BufferPool {
    capacity: usize,
    free: Vec<RelayBuffer>,
    max_idle: usize,
    outstanding: usize,
}

impl BufferPool {
    /// Creates a pool of buffers of `buffer_capacity` bytes that keeps at most
    /// `max_idle` idle buffers. Allocates nothing until the first `take`.
    pub fn new(buffer_capacity: usize, max_idle: usize) -> Self {
        Self {
            capacity: buffer_capacity,
            free: Vec::new(),
            max_idle,
            outstanding: 0,
        }
    }

    /// Returns an empty buffer of the current capacity: an idle one if any,
    /// otherwise a fresh allocation.
    pub fn take(&mut self) -> RelayBuffer {
        self.outstanding += 1;
        self.free
            .pop()
            .unwrap_or_else(|| RelayBuffer::with_capacity(self.capacity))
    }

    /// Returns a buffer obtained from [`take`](Self::take).
    ///
    /// The buffer is cleared and kept for reuse if fewer than `max_idle` are
    /// idle and its capacity is the current one (it may predate a
    /// [`set_buffer_capacity`](Self::set_buffer_capacity)); otherwise it is
    /// freed. Giving back more buffers than were taken does not underflow the
    /// outstanding count.
    pub fn give_back(&mut self, mut buf: RelayBuffer) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if buf.capacity() == self.capacity && self.free.len() < self.max_idle {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Switches future buffers to `capacity` bytes and frees idle buffers of
    /// the old size. Buffers already taken keep their size until given back,
    /// when they are freed.
    pub fn set_buffer_capacity(&mut self, capacity: usize) {
        if capacity != self.capacity {
            self.capacity = capacity;
            self.free.clear();
        }
    }

    /// Capacity of the buffers `take` returns.
    pub fn buffer_capacity(&self) -> usize {
        self.capacity
    }

    #[cfg(test)]
    /// Number of buffers taken and not yet given back.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    #[cfg(test)]
    /// Number of buffers kept for reuse.
    pub fn idle(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a read of `bytes` into the buffer, returning how many fit.
    fn read_in(buf: &mut RelayBuffer, bytes: &[u8]) -> usize {
        let space = buf.space();
        let n = bytes.len().min(space.len());
        space[..n].copy_from_slice(&bytes[..n]);
        buf.commit(n);
        n
    }

    #[test]
    fn fill_then_consume() {
        let mut buf = RelayBuffer::with_capacity(8);
        assert!(buf.is_empty() && !buf.is_full());
        assert_eq!(read_in(&mut buf, b"hello"), 5);
        assert_eq!(buf.data(), b"hello");
        assert_eq!(read_in(&mut buf, b"world"), 3);
        assert!(buf.is_full());
        assert!(buf.space().is_empty());
        assert_eq!(buf.data(), b"hellowor");

        buf.consume(3);
        assert_eq!(buf.data(), b"lowor");
        buf.consume(5);
        assert!(buf.is_empty());
        assert_eq!(buf.space().len(), 8, "empty buffer rewinds to the front");
    }

    #[test]
    fn space_compacts_when_tail_is_exhausted() {
        let mut buf = RelayBuffer::with_capacity(8);
        read_in(&mut buf, b"abcdefgh");
        buf.consume(5);
        assert!(!buf.is_full());
        assert_eq!(buf.space().len(), 5);
        assert_eq!(buf.data(), b"fgh");
        assert_eq!(read_in(&mut buf, b"12345"), 5);
        assert_eq!(buf.data(), b"fgh12345");
    }

    #[test]
    fn space_does_not_copy_while_tail_has_room() {
        let mut buf = RelayBuffer::with_capacity(8);
        read_in(&mut buf, b"abcd");
        buf.consume(2);
        assert_eq!(buf.space().len(), 4);
        assert_eq!(buf.data(), b"cd");
    }

    #[test]
    fn out_of_range_counts_are_clamped() {
        let mut buf = RelayBuffer::with_capacity(4);
        buf.commit(100);
        assert!(buf.is_full());
        buf.consume(100);
        assert!(buf.is_empty());
        buf.consume(1);
        assert!(buf.is_empty());

        read_in(&mut buf, b"ab");
        buf.commit(usize::MAX);
        assert_eq!(buf.len(), 4);
        buf.consume(usize::MAX);
        assert!(buf.is_empty());
    }

    #[test]
    fn zero_capacity_is_empty_and_full() {
        let mut buf = RelayBuffer::with_capacity(0);
        assert!(buf.is_empty() && buf.is_full());
        assert!(buf.space().is_empty());
        buf.commit(1);
        buf.consume(1);
        assert!(buf.data().is_empty());
    }

    #[test]
    fn pool_reuses_the_same_allocation() {
        let mut pool = BufferPool::new(16, 4);
        assert_eq!(pool.idle(), 0);
        let mut buf = pool.take();
        read_in(&mut buf, b"leftover");
        let ptr = buf.data().as_ptr();
        assert_eq!(pool.outstanding(), 1);

        pool.give_back(buf);
        assert_eq!((pool.outstanding(), pool.idle()), (0, 1));
        let mut again = pool.take();
        assert!(again.is_empty(), "returned buffers are cleared");
        assert_eq!(again.space().as_ptr(), ptr);
    }

    #[test]
    fn pool_keeps_at_most_max_idle() {
        let mut pool = BufferPool::new(16, 2);
        let burst: Vec<_> = (0..5).map(|_| pool.take()).collect();
        assert_eq!(pool.outstanding(), 5);
        for buf in burst {
            pool.give_back(buf);
        }
        assert_eq!((pool.outstanding(), pool.idle()), (0, 2));

        pool.give_back(RelayBuffer::with_capacity(16));
        assert_eq!(pool.outstanding(), 0, "no underflow");
    }

    #[test]
    fn capacity_change_drops_old_buffers() {
        let mut pool = BufferPool::new(16, 4);
        let old = pool.take();
        let idle = pool.take();
        pool.give_back(idle);
        assert_eq!(pool.idle(), 1);

        pool.set_buffer_capacity(32);
        assert_eq!((pool.idle(), pool.buffer_capacity()), (0, 32));
        pool.give_back(old);
        assert_eq!((pool.idle(), pool.outstanding()), (0, 0));
        assert_eq!(pool.take().capacity(), 32);

        // Same size again: idle buffers survive.
        let buf = pool.take();
        pool.give_back(buf);
        pool.set_buffer_capacity(32);
        assert_eq!(pool.idle(), 1);
    }
}
