//! Steady-state relaying allocates nothing: a counting global allocator watches
//! the loop thread while megabytes go through an in-process lock, both in
//! lock-step echo and in a one-way flood that keeps the relay busy (on the
//! loop's busy list turn after turn) into a reader that keeps falling behind.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use common::{KIB, MIB, Upstream, WAIT, connect, echo_handler, quiet_lock, wait_until};
use tcplock::{Outcome, Splice};

/// Counts allocations made on threads that opted in.
struct CountingAllocator;

static LOOP_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting touches only an atomic and a const-initialised thread-local, neither
// of which allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            LOOP_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is passed through as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            LOOP_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc` is passed through as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The flood's first byte: the upstream then writes without end.
const FLOOD: u8 = b'F';

/// Echoes, except that a connection opening with [`FLOOD`] gets an endless
/// stream instead (until the client goes away).
fn echo_or_flood() -> Upstream {
    Upstream::spawn(|mut s, active| {
        let mut first = [0u8; 1];
        if s.read_exact(&mut first).is_err() {
            return;
        }
        if first[0] != FLOOD {
            if s.write_all(&first).is_ok() {
                echo_handler(s, active);
            }
            return;
        }
        let chunk = vec![0xa5_u8; 256 * KIB];
        // Bounded: ends when the client leaves, after 4 GiB, or on the
        // stand-in's write timeout.
        for _ in 0..(16 * 1024) {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    })
}

/// Sends `total` bytes and reads the echo back, in 64 KiB steps.
fn echo_through(client: &mut std::net::TcpStream, total: usize) {
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut back = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        client.write_all(&chunk).expect("write");
        client.read_exact(&mut back).expect("read the echo");
        sent += chunk.len();
    }
}

/// Reads `total` bytes of the flood in small reads, falling behind now and
/// then, so the relay alternates between using up its turn and waiting for
/// the reader.
fn read_flood(client: &mut std::net::TcpStream, total: usize) {
    let mut buf = vec![0u8; 4 * KIB];
    let mut got = 0;
    let mut since_pause = 0;
    while got < total {
        let n = client.read(&mut buf).expect("read the flood");
        assert!(n > 0, "the flood ended after {got} bytes");
        got += n;
        since_pause += n;
        if since_pause >= 512 * KIB {
            since_pause = 0;
            // Deliberate slowness of the reader, not a wait for a condition.
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Every relay path, one after the other: the counter is shared by every
/// loop thread, so they must not run at once. Debug builds also assert, on
/// the loop thread, that a busy relay is listed for its next turn only once.
#[test]
fn relaying_megabytes_allocates_nothing_on_the_loop_thread() {
    for mode in [Splice::Off, Splice::Auto, Splice::On] {
        relay_without_allocating(mode);
    }
}

fn relay_without_allocating(mode: Splice) {
    let upstream = echo_or_flood();
    let lock = quiet_lock(&upstream).splice(mode).build().expect("build");
    let addr = lock.local_addr();
    let handle = lock.handle();
    let at_start = LOOP_ALLOCATIONS.load(Ordering::Relaxed);
    let runner = thread::spawn(move || {
        COUNTED.with(|counted| counted.set(true));
        lock.run().expect("run");
    });

    let mut client = connect(addr);
    // Warm-up: the connection, its relay state and its buffers come into being.
    echo_through(&mut client, MIB);
    let before = LOOP_ALLOCATIONS.load(Ordering::Relaxed);
    echo_through(&mut client, 32 * MIB);
    let during = LOOP_ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(
        during, 0,
        "allocations on the loop thread while echoing 32 MiB with --splice {mode}"
    );
    drop(client);
    // Its close (returning its buffers to the pool) is no part of the
    // flood's steady state: let it finish before counting.
    assert!(
        wait_until(WAIT, || handle.stats().count(Outcome::Ok) == 1),
        "the echo connection never closed"
    );

    let mut flooded = connect(addr);
    flooded.write_all(&[FLOOD]).expect("ask for the flood");
    read_flood(&mut flooded, 4 * MIB);
    let before_flood = LOOP_ALLOCATIONS.load(Ordering::Relaxed);
    read_flood(&mut flooded, 64 * MIB);
    let during = LOOP_ALLOCATIONS.load(Ordering::Relaxed) - before_flood;
    assert_eq!(
        during, 0,
        "allocations on the loop thread while flooding 64 MiB with --splice {mode}"
    );
    drop(flooded);

    handle.stop();
    assert!(wait_until(WAIT, || runner.is_finished()));
    runner.join().expect("loop thread");
    // The counter is alive: setting up the connection did allocate.
    assert!(before > at_start);
}
