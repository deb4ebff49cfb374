//! The line of waiting connections: first come, first served, with leaving in
//! O(1).
//!
//! A connection that leaves stays behind as a stale entry: its handle no
//! longer names a queued connection (its slot was freed or reused under
//! another id, or it was taken at the head). Stale entries are skipped when
//! they reach the head and swept out once they outnumber the live ones, so
//! the line never holds more than about twice the waiting clients and each
//! leave costs O(1) amortised. Which entries are live only the slab knows, so
//! the methods that may meet stale entries take the test as a parameter.

use std::collections::VecDeque;

use super::ConnRef;

/// Stale entries are swept out only once there are at least this many, so a
/// short line does not sweep on every leave.
pub(super) const SWEEP_MIN_STALE: usize = 8;

#[derive(Default)]
pub(super) struct WaitQueue {
    /// Accept order (a connection put back takes back its place); the
    /// head entry is always live.
    entries: VecDeque<ConnRef>,
    /// Live entries: the connections in state Queued.
    live: usize,
    /// Entries pushed, popped, skipped or swept, for the test that pins
    /// leaving at O(1) without measuring time.
    visited: u64,
}

impl WaitQueue {
    /// Connections waiting in line.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// The next in line.
    pub(super) fn front(&self) -> Option<ConnRef> {
        self.entries.front().copied()
    }

    /// A newcomer joins at the back.
    pub(super) fn push_back(&mut self, conn: ConnRef) {
        self.entries.push_back(conn);
        self.live += 1;
        self.visited += 1;
    }

    /// A connection put back in line (its hook failed, its connect failed,
    /// its instance went away) takes back its place at the head, behind the
    /// entries `stays_ahead` keeps in front of it: others put back before it
    /// that were accepted before it (and stale entries among them). Those
    /// put back form the front of the line, so the walk passes only over
    /// them.
    pub(super) fn put_back(
        &mut self,
        conn: ConnRef,
        stays_ahead: impl Fn(ConnRef) -> bool,
        is_live: impl Fn(ConnRef) -> bool,
    ) {
        let place = self
            .entries
            .iter()
            .position(|entry| !stays_ahead(*entry))
            .unwrap_or(self.entries.len());
        self.visited += place as u64 + 1;
        self.entries.insert(place, conn);
        self.live += 1;
        self.skip_stale_head(&is_live);
    }

    /// The last in line.
    pub(super) fn back(&self) -> Option<ConnRef> {
        self.entries.back().copied()
    }

    /// Takes the head out (it is being activated), then restores the rule
    /// that the head is live.
    pub(super) fn pop_front(&mut self, is_live: impl Fn(ConnRef) -> bool) {
        if self.entries.pop_front().is_some() {
            self.live -= 1;
            self.visited += 1;
        }
        self.skip_stale_head(&is_live);
        self.sweep_if_mostly_stale(&is_live);
    }

    /// A queued connection left (`is_live` already says so for it): its entry
    /// stays behind unless it is at either end or stale entries now dominate.
    pub(super) fn left(&mut self, conn: ConnRef, is_live: impl Fn(ConnRef) -> bool) {
        self.live -= 1;
        if self.live == 0 {
            // Every entry is stale; copy entries need no drop, so this costs
            // nothing per entry.
            self.entries.clear();
            return;
        }
        if self.entries.back() == Some(&conn) {
            self.entries.pop_back();
            self.visited += 1;
        }
        if self.entries.front() == Some(&conn) {
            self.skip_stale_head(&is_live);
        }
        self.sweep_if_mostly_stale(&is_live);
    }

    /// The entries in line order, stale ones included: `position` filters
    /// them with the same test as the other methods.
    pub(super) fn iter(&self) -> impl Iterator<Item = ConnRef> + '_ {
        self.entries.iter().copied()
    }

    /// Every entry, stale ones included, for the invariant checks.
    #[cfg(any(debug_assertions, test, feature = "model"))]
    pub(super) fn entries(&self) -> impl Iterator<Item = ConnRef> + '_ {
        self.entries.iter().copied()
    }

    /// Entries that no longer name a waiting connection.
    pub(super) fn stale(&self) -> usize {
        self.entries.len() - self.live
    }

    #[cfg(test)]
    pub(super) fn visited(&self) -> u64 {
        self.visited
    }

    #[cfg(test)]
    pub(super) fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Sweeps the stale entries out once they outnumber the live ones. Each
    /// sweep costs at most twice the stale entries it removes, and each was
    /// left by one leave, so leaving stays O(1) amortised.
    fn sweep_if_mostly_stale(&mut self, is_live: &impl Fn(ConnRef) -> bool) {
        let stale = self.stale();
        if stale > self.live && stale >= SWEEP_MIN_STALE {
            self.visited += self.entries.len() as u64;
            self.entries.retain(|entry| is_live(*entry));
            // Give back the memory of a line that was once much longer.
            let keep = self.entries.len().max(SWEEP_MIN_STALE);
            if self.entries.capacity() > 4 * keep {
                self.entries.shrink_to(2 * keep);
            }
        }
    }

    fn skip_stale_head(&mut self, is_live: &impl Fn(ConnRef) -> bool) {
        while let Some(&head) = self.entries.front() {
            if is_live(head) {
                return;
            }
            self.entries.pop_front();
            self.visited += 1;
        }
    }
}
