//! A hashed timer wheel with an injected clock.
//!
//! The wheel never reads the clock: every method that needs "now" takes it as a
//! `u64` count of milliseconds on a monotonic clock, so the core that owns it
//! stays deterministic and tests can drive time by hand.
//!
//! # Resolution
//!
//! Firing is exact to the millisecond: every entry keeps its absolute deadline
//! and [`TimerWheel::poll_expired`] hands it out at the first poll whose `now_ms`
//! is at or past that deadline, never earlier. The tick ([`TICK_MS`]) and slot
//! count ([`SLOTS`]) only decide how entries are bucketed, i.e. how much work a
//! poll does; deadlines further than one revolution ([`REVOLUTION_MS`]) away
//! share buckets with nearer ones and are skipped until they are really due.
//!
//! # Order
//!
//! `poll_expired` always returns the pending entry with the smallest deadline,
//! ties broken by insertion order, provided that entry is due. Consequently
//! entries fire in deadline order, except that an entry inserted with an
//! already-passed deadline cannot fire before entries that were returned
//! before it existed.

use std::cell::Cell;
use std::fmt;
use std::num::NonZeroU64;

use slab::Slab;

/// Width of one wheel slot, in milliseconds.
pub const TICK_MS: u64 = 8;

/// Number of slots in the wheel.
pub const SLOTS: usize = 512;

/// Span of one full turn of the wheel, in milliseconds.
#[cfg(test)]
pub const REVOLUTION_MS: u64 = TICK_MS * SLOTS as u64;

/// Index into `TimerWheel::lists` of the list of entries already found due.
/// The wheel slots are `0..SLOTS`.
const DUE: usize = SLOTS;

/// End-of-list marker for the intrusive links.
const NIL: usize = usize::MAX;

/// A set of pending deadlines, each carrying a value of type `T`.
///
/// Insertion and cancellation are O(1). [`poll_expired`](Self::poll_expired)
/// costs at most O(slots + entries in the visited slots) per advance of the
/// clock however far time jumps, plus O(1) per fired entry (and a sort of each
/// batch that becomes due together).
pub struct TimerWheel<T> {
    /// Every pending entry, whether still in a wheel slot or already due.
    entries: Slab<Entry<T>>,
    /// Heads and tails of the `SLOTS` slot lists, then of the due list.
    lists: Box<[Links]>,
    /// The largest time ever passed in. Every entry whose deadline is at or
    /// before it sits on the due list; every other entry sits in the slot of its
    /// deadline's tick.
    now_ms: u64,
    /// Source of [`TimerKey`] generations: one per insert, so a key never
    /// matches a later entry that reuses its slab slot.
    next_generation: u64,
    /// Earliest deadline among entries still in the wheel slots (not the due
    /// list), computed lazily because removals may invalidate it.
    wheel_min: Cell<WheelMin>,
    /// Reused between polls so collecting a batch of due entries does not
    /// allocate in steady state.
    scratch: Vec<usize>,
}

/// Handle to one entry of a [`TimerWheel`], returned by
/// [`insert`](TimerWheel::insert).
///
/// Keys are never reused: once its entry fired or was cancelled, a key is
/// stale and every method treats it as absent, even if a new entry took the
/// same storage slot.
///
/// One word: the entry's slab index in the low [`INDEX_BITS`] bits, the low
/// bits of its generation above them, never zero (generations start at 1), so
/// an `Option<TimerKey>` is one word too. Every connection holds up to four
/// of them. The generation bits wrap only after 2^40 inserts (a year at 30,000
/// a second), and a key is only ever compared while its entry is pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey(NonZeroU64);

/// Entries a wheel can hold: 16 million, far above what the settings' caps
/// allow (a few timers for each of at most a million queued and a million
/// proxying connections).
const INDEX_BITS: u32 = 24;
/// The generation bits a key keeps.
const GENERATION_MASK: u64 = (1 << (64 - INDEX_BITS)) - 1;

impl TimerKey {
    fn new(index: usize, generation: u64) -> TimerKey {
        debug_assert!(index < 1 << INDEX_BITS, "timer index {index} out of range");
        debug_assert!(generation > 0);
        let packed = (generation << INDEX_BITS) | index as u64;
        // Never zero: `insert` skips generations whose kept bits are zero.
        TimerKey(NonZeroU64::new(packed).unwrap_or(NonZeroU64::MIN))
    }

    fn index(self) -> usize {
        (self.0.get() & ((1 << INDEX_BITS) - 1)) as usize
    }

    /// Whether this key names an entry of `generation`.
    fn matches(self, generation: u64) -> bool {
        self.0.get() >> INDEX_BITS == generation & GENERATION_MASK
    }
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose clock starts at `now_ms`.
    ///
    /// Allocates the slot table (`SLOTS + 1` pairs of indices) once; entries are
    /// stored in a slab that grows with the number of pending timers.
    pub fn new(now_ms: u64) -> Self {
        Self {
            entries: Slab::new(),
            lists: vec![Links::EMPTY; SLOTS + 1].into_boxed_slice(),
            now_ms,
            next_generation: 1,
            wheel_min: Cell::new(WheelMin::Known(None)),
            scratch: Vec::new(),
        }
    }

    /// Adds an entry that becomes due at `deadline_ms`, and returns its key.
    ///
    /// A deadline at or before the latest time the wheel has seen (the one
    /// given to [`new`](Self::new) or to the last
    /// [`poll_expired`](Self::poll_expired)) is already due: the entry comes
    /// out of the next `poll_expired`, whatever time that poll passes.
    pub fn insert(&mut self, deadline_ms: u64, value: T) -> TimerKey {
        if self.next_generation & GENERATION_MASK == 0 {
            self.next_generation += 1;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let index = self.entries.insert(Entry {
            deadline_ms,
            generation,
            list: NIL,
            prev: NIL,
            next: NIL,
            value,
        });

        if deadline_ms <= self.now_ms {
            self.insert_due_sorted(index);
        } else {
            self.push_back(slot_of(deadline_ms), index);
            if let WheelMin::Known(min) = self.wheel_min.get() {
                let min = min.map_or(deadline_ms, |m| m.min(deadline_ms));
                self.wheel_min.set(WheelMin::Known(Some(min)));
            }
        }
        TimerKey::new(index, generation)
    }

    /// Removes the entry of `key` and returns its value.
    ///
    /// Returns `None`, and changes nothing, when the key is stale: its entry
    /// already fired or was cancelled, even if the storage slot now holds a
    /// newer entry.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        if !self.contains(key) {
            return None;
        }
        let list = self.entries[key.index()].list;
        let deadline_ms = self.entries[key.index()].deadline_ms;
        self.unlink(key.index());
        if list != DUE && self.wheel_min.get() == WheelMin::Known(Some(deadline_ms)) {
            self.wheel_min.set(WheelMin::Stale);
        }
        Some(self.entries.remove(key.index()).value)
    }

    /// Removes and returns one entry whose deadline is at or before `now_ms`,
    /// or `None` when no entry is due. Call it until it returns `None`.
    ///
    /// The entry returned is the pending one with the smallest deadline (ties
    /// in insertion order). A `now_ms` smaller than a time seen before is
    /// treated as that earlier time: the clock never goes backwards.
    ///
    /// Cost: advancing the clock visits at most `SLOTS` slots, however long
    /// the jump, and examines each entry in them once; polling again at the
    /// same time is O(1).
    pub fn poll_expired(&mut self, now_ms: u64) -> Option<(TimerKey, T)> {
        if now_ms > self.now_ms {
            self.advance(now_ms);
        }
        let index = self.lists[DUE].head;
        if index == NIL {
            return None;
        }
        self.unlink(index);
        let entry = self.entries.remove(index);
        let key = TimerKey::new(index, entry.generation);
        Some((key, entry.value))
    }

    /// Returns the earliest pending deadline, exactly (no rounding), or `None`
    /// when the wheel is empty.
    ///
    /// When some entry is already due (its deadline is at or before the last
    /// time passed to [`new`](Self::new) or
    /// [`poll_expired`](Self::poll_expired)), the value returned is that
    /// entry's deadline and so is at or before that time: the caller should
    /// poll again at once. Otherwise it is later than that time.
    ///
    /// Cost: O(1) when cached; after the earliest entry fired or was cancelled,
    /// one walk of the slots up to the next entry, O(slots + entries) at worst.
    pub fn next_deadline(&self) -> Option<u64> {
        let due = self.lists[DUE].head;
        if due != NIL {
            // The due list is sorted and every due deadline is <= now_ms < any
            // deadline still in the wheel, so its head is the global minimum.
            return Some(self.entries[due].deadline_ms);
        }
        match self.wheel_min.get() {
            WheelMin::Known(min) => min,
            WheelMin::Stale => {
                let min = self.scan_wheel_min();
                self.wheel_min.set(WheelMin::Known(min));
                min
            }
        }
    }

    /// Number of pending entries, due or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    /// True when no entry is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When `key`'s entry is due, if it is still pending.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        self.entries
            .get(key.index())
            .filter(|entry| key.matches(entry.generation))
            .map(|entry| entry.deadline_ms)
    }

    /// True when `key`'s entry is still pending (neither fired nor cancelled).
    pub fn contains(&self, key: TimerKey) -> bool {
        self.entries
            .get(key.index())
            .is_some_and(|entry| key.matches(entry.generation))
    }

    /// Moves the clock to `now_ms` (> `self.now_ms`), moving every entry that
    /// became due onto the tail of the due list in (deadline, insertion) order.
    fn advance(&mut self, now_ms: u64) {
        let first_tick = self.now_ms / TICK_MS;
        let last_tick = now_ms / TICK_MS;
        // The current tick is visited again: an entry may have been filed in it
        // with a deadline after the previous `now_ms`. Past one revolution every
        // slot has been visited, which bounds the work of a long jump.
        let visits = (last_tick - first_tick).min(SLOTS as u64 - 1) + 1;

        let mut batch = std::mem::take(&mut self.scratch);
        for tick in first_tick..first_tick + visits {
            let mut index = self.lists[slot_of_tick(tick)].head;
            while index != NIL {
                let entry = &self.entries[index];
                let next = entry.next;
                if entry.deadline_ms <= now_ms {
                    self.unlink(index);
                    batch.push(index);
                }
                index = next;
            }
        }

        if !batch.is_empty() {
            self.wheel_min.set(WheelMin::Stale);
            // Generations grow with each insert, so they order ties by
            // insertion; every deadline here is > the old now_ms >= every
            // deadline already on the due list, so appending keeps it sorted.
            batch.sort_unstable_by_key(|&i| {
                (self.entries[i].deadline_ms, self.entries[i].generation)
            });
            for &index in &batch {
                self.push_back(DUE, index);
            }
            batch.clear();
        }
        self.scratch = batch;
        self.now_ms = now_ms;
    }

    /// Files an already-due entry in the due list, after every entry with a
    /// smaller or equal deadline. Walks from the tail because the list is
    /// normally empty or short.
    fn insert_due_sorted(&mut self, index: usize) {
        let deadline_ms = self.entries[index].deadline_ms;
        let mut after = self.lists[DUE].tail;
        while after != NIL && self.entries[after].deadline_ms > deadline_ms {
            after = self.entries[after].prev;
        }
        let before = if after == NIL {
            self.lists[DUE].head
        } else {
            self.entries[after].next
        };

        let entry = &mut self.entries[index];
        entry.list = DUE;
        entry.prev = after;
        entry.next = before;
        match after {
            NIL => self.lists[DUE].head = index,
            _ => self.entries[after].next = index,
        }
        match before {
            NIL => self.lists[DUE].tail = index,
            _ => self.entries[before].prev = index,
        }
    }

    /// Earliest deadline among the entries still in the wheel slots.
    fn scan_wheel_min(&self) -> Option<u64> {
        let first_tick = self.now_ms / TICK_MS;
        let mut min: Option<u64> = None;
        for tick in first_tick..first_tick + SLOTS as u64 {
            let mut index = self.lists[slot_of_tick(tick)].head;
            while index != NIL {
                let entry = &self.entries[index];
                min = Some(min.map_or(entry.deadline_ms, |m| m.min(entry.deadline_ms)));
                index = entry.next;
            }
            // Every wheel deadline is in a tick >= first_tick, and all ticks up
            // to `tick` are visited: anything unseen is in a later tick, so a
            // minimum within this tick cannot be beaten.
            if min.is_some_and(|m| m / TICK_MS <= tick) {
                break;
            }
        }
        min
    }

    /// Appends an unlinked entry to `list`.
    fn push_back(&mut self, list: usize, index: usize) {
        let tail = self.lists[list].tail;
        let entry = &mut self.entries[index];
        entry.list = list;
        entry.prev = tail;
        entry.next = NIL;
        match tail {
            NIL => self.lists[list].head = index,
            _ => self.entries[tail].next = index,
        }
        self.lists[list].tail = index;
    }

    /// Takes a linked entry out of its list, leaving it in the slab.
    fn unlink(&mut self, index: usize) {
        let entry = &mut self.entries[index];
        let (list, prev, next) = (entry.list, entry.prev, entry.next);
        entry.list = NIL;
        entry.prev = NIL;
        entry.next = NIL;
        match prev {
            NIL => self.lists[list].head = next,
            _ => self.entries[prev].next = next,
        }
        match next {
            NIL => self.lists[list].tail = prev,
            _ => self.entries[next].prev = prev,
        }
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    /// Summarises the wheel without requiring `T: Debug`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now_ms", &self.now_ms)
            .field("len", &self.len())
            .field("next_deadline", &self.next_deadline())
            .finish()
    }
}

/// One pending timer, linked into either a wheel slot or the due list.
struct Entry<T> {
    deadline_ms: u64,
    generation: u64,
    /// Which of `TimerWheel::lists` holds the entry.
    list: usize,
    prev: usize,
    next: usize,
    value: T,
}

/// Ends of one intrusive list; `NIL` when empty.
#[derive(Clone, Copy)]
struct Links {
    head: usize,
    tail: usize,
}

impl Links {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
    };
}

/// Cached earliest deadline of the wheel slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WheelMin {
    /// `None` means the slots are empty.
    Known(Option<u64>),
    /// The cached minimum left the wheel; recompute on demand.
    Stale,
}

fn slot_of(deadline_ms: u64) -> usize {
    slot_of_tick(deadline_ms / TICK_MS)
}

fn slot_of_tick(tick: u64) -> usize {
    // The remainder is < SLOTS, so it fits in usize.
    (tick % SLOTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn drain<T>(wheel: &mut TimerWheel<T>, now_ms: u64) -> Vec<T> {
        std::iter::from_fn(|| wheel.poll_expired(now_ms).map(|(_, v)| v)).collect()
    }

    #[test]
    fn fires_in_deadline_order_then_insertion_order() {
        let mut wheel = TimerWheel::new(1_000);
        wheel.insert(1_300, "c");
        wheel.insert(1_100, "a");
        wheel.insert(1_200, "b1");
        wheel.insert(1_200, "b2");
        wheel.insert(1_100 + REVOLUTION_MS, "far");

        assert_eq!(drain(&mut wheel, 1_099), Vec::<&str>::new());
        assert_eq!(drain(&mut wheel, 1_250), ["a", "b1", "b2"]);
        assert_eq!(drain(&mut wheel, 5_000), ["c"]);
        assert_eq!(drain(&mut wheel, 10_000), ["far"]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn fires_exactly_at_deadline_not_at_tick_boundary() {
        let mut wheel = TimerWheel::new(0);
        wheel.insert(13, ());
        assert!(wheel.poll_expired(12).is_none());
        assert!(wheel.poll_expired(13).is_some());
    }

    #[test]
    fn far_future_deadline_does_not_fire_early() {
        let mut wheel = TimerWheel::new(0);
        // Same slot as 100, several revolutions later.
        let far = 100 + 3 * REVOLUTION_MS;
        wheel.insert(far, "far");
        wheel.insert(100, "near");
        assert_eq!(drain(&mut wheel, 100), ["near"]);
        for now in (100..far).step_by(7) {
            assert!(wheel.poll_expired(now).is_none(), "fired at {now}");
        }
        assert_eq!(drain(&mut wheel, far), ["far"]);
    }

    #[test]
    fn past_deadline_fires_at_next_poll() {
        let mut wheel = TimerWheel::new(10_000);
        wheel.insert(10_000, "now");
        wheel.insert(3, "long ago");
        assert_eq!(wheel.next_deadline(), Some(3));
        // Even a poll that passes an older time (clamped) yields them.
        assert_eq!(drain(&mut wheel, 0), ["long ago", "now"]);

        wheel.poll_expired(20_000);
        wheel.insert(15_000, "after a poll");
        assert_eq!(drain(&mut wheel, 20_000), ["after a poll"]);
    }

    #[test]
    fn cancel_removes_and_returns_value() {
        let mut wheel = TimerWheel::new(0);
        let a = wheel.insert(50, "a");
        let b = wheel.insert(60, "b");
        assert!(wheel.contains(a));
        assert_eq!(wheel.cancel(a), Some("a"));
        assert!(!wheel.contains(a));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.next_deadline(), Some(60));
        assert_eq!(
            wheel.poll_expired(100).map(|(k, v)| (k == b, v)),
            Some((true, "b"))
        );
    }

    #[test]
    fn cancel_of_a_due_entry_works() {
        let mut wheel = TimerWheel::new(0);
        let a = wheel.insert(10, 1);
        let b = wheel.insert(20, 2);
        let c = wheel.insert(30, 3);
        assert_eq!(wheel.poll_expired(100).map(|(k, _)| k), Some(a));
        assert_eq!(wheel.cancel(b), Some(2));
        assert_eq!(wheel.poll_expired(100).map(|(k, _)| k), Some(c));
        assert!(wheel.poll_expired(100).is_none());
    }

    #[test]
    fn stale_key_for_reused_slot_is_harmless() {
        let mut wheel = TimerWheel::new(0);
        let old = wheel.insert(10, "old");
        assert_eq!(wheel.poll_expired(10).map(|(k, _)| k), Some(old));
        let new = wheel.insert(20, "new");
        assert_eq!(new.index(), old.index(), "test needs the slab slot reused");
        assert_ne!(new, old);

        assert!(!wheel.contains(old));
        assert_eq!(wheel.cancel(old), None);
        assert!(wheel.contains(new));
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.poll_expired(20), Some((new, "new")));
    }

    #[test]
    fn big_time_jump_fires_everything_due_once() {
        let mut wheel = TimerWheel::new(0);
        for i in 0..2_000u64 {
            wheel.insert(i * 37, i);
        }
        let hour = 3_600_000;
        wheel.insert(hour + 1, u64::MAX);
        let fired = drain(&mut wheel, hour);
        assert_eq!(fired, (0..2_000).collect::<Vec<_>>());
        assert_eq!(wheel.next_deadline(), Some(hour + 1));
        assert_eq!(drain(&mut wheel, u64::MAX), [u64::MAX]);
    }

    #[test]
    fn next_deadline_semantics() {
        let mut wheel = TimerWheel::new(100);
        assert_eq!(wheel.next_deadline(), None);

        let a = wheel.insert(5_000 + REVOLUTION_MS, ());
        wheel.insert(5_000 + 2 * REVOLUTION_MS, ());
        assert_eq!(wheel.next_deadline(), Some(5_000 + REVOLUTION_MS));
        let b = wheel.insert(333, ());
        assert_eq!(wheel.next_deadline(), Some(333), "exact, not rounded");

        wheel.cancel(b);
        assert_eq!(wheel.next_deadline(), Some(5_000 + REVOLUTION_MS));
        wheel.cancel(a);
        assert_eq!(wheel.next_deadline(), Some(5_000 + 2 * REVOLUTION_MS));

        // Something due: the answer is <= the last polled time.
        wheel.insert(50, ());
        assert_eq!(wheel.next_deadline(), Some(50));
        wheel.insert(400, ());
        wheel.insert(401, ());
        assert!(wheel.poll_expired(500).is_some());
        assert_eq!(wheel.next_deadline(), Some(400));
    }

    #[test]
    fn randomized_against_btreemap_model() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20 {
            let mut now = rng.below(1 << 20);
            let mut wheel = TimerWheel::new(now);
            // (deadline, insertion seq) -> key, value
            let mut model: BTreeMap<(u64, u64), (TimerKey, u64)> = BTreeMap::new();
            let mut retired: Vec<TimerKey> = Vec::new();
            let mut seq = 0;

            for _ in 0..2_000 {
                match rng.below(10) {
                    0..=3 => {
                        let deadline = match rng.below(4) {
                            0 => now.saturating_sub(rng.below(100)),
                            1 => now + rng.below(50),
                            2 => now + rng.below(REVOLUTION_MS * 3),
                            _ => now + rng.below(3_600_000),
                        };
                        let key = wheel.insert(deadline, seq);
                        model.insert((deadline, seq), (key, seq));
                        seq += 1;
                    }
                    4 => {
                        if let Some((&k, &(key, value))) =
                            model.iter().nth(rng.below(model.len() as u64 + 1) as usize)
                        {
                            assert_eq!(wheel.cancel(key), Some(value));
                            model.remove(&k);
                            retired.push(key);
                        }
                    }
                    5 => {
                        if !retired.is_empty() {
                            let key = retired[rng.below(retired.len() as u64) as usize];
                            assert_eq!(wheel.cancel(key), None);
                            assert!(!wheel.contains(key));
                        }
                    }
                    _ => {
                        now += match rng.below(5) {
                            0 => 0,
                            1..=3 => rng.below(40),
                            _ => rng.below(REVOLUTION_MS * 20),
                        };
                        while let Some((key, value)) = wheel.poll_expired(now) {
                            let (&k, &expected) =
                                model.iter().next().expect("fired from empty model");
                            assert!(k.0 <= now, "fired early: deadline {} now {now}", k.0);
                            assert_eq!((key, value), expected);
                            model.remove(&k);
                            retired.push(key);
                        }
                        if let Some((&(deadline, _), _)) = model.iter().next() {
                            assert!(deadline > now, "left a due entry behind");
                        }
                    }
                }
                assert_eq!(wheel.len(), model.len());
                assert_eq!(wheel.next_deadline(), model.keys().next().map(|&(d, _)| d));
            }
        }
    }

    /// Tiny deterministic PRNG so the randomized test needs no extra crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform-enough value in `0..n` (0 when `n` is 0).
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 { 0 } else { self.next() % n }
        }
    }

    #[test]
    fn a_key_is_one_word_and_its_generation_bits_never_make_it_zero() {
        assert_eq!(std::mem::size_of::<Option<TimerKey>>(), 8);
        let mut wheel = TimerWheel::new(0);
        // Just below a wrap of the kept generation bits: the insert at the
        // wrap skips the all-zero generation, and its key still matches.
        wheel.next_generation = GENERATION_MASK;
        let before = wheel.insert(10, "before");
        wheel.cancel(before);
        let at_wrap = wheel.insert(10, "at wrap");
        assert_eq!(at_wrap.index(), before.index());
        assert!(wheel.contains(at_wrap));
        assert!(!wheel.contains(before));
        assert_eq!(wheel.cancel(at_wrap), Some("at wrap"));
    }
}
