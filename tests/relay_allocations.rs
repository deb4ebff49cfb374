//! Steady-state relaying allocates nothing: a counting global allocator watches
//! the loop thread while megabytes go through an in-process lock.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use common::{MIB, Upstream, WAIT, connect, quiet_lock, wait_until};
use tcplock::Splice;

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

/// Both relay paths, one after the other: the counter is shared by every
/// loop thread, so the two must not run at once.
#[test]
fn relaying_megabytes_allocates_nothing_on_the_loop_thread() {
    for mode in [Splice::Off, Splice::Auto] {
        relay_without_allocating(mode);
    }
}

fn relay_without_allocating(mode: Splice) {
    let upstream = Upstream::echo();
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
        "allocations on the loop thread while relaying 32 MiB with --splice {mode}"
    );

    drop(client);
    handle.stop();
    assert!(wait_until(WAIT, || runner.is_finished()));
    runner.join().expect("loop thread");
    // The counter is alive: setting up the connection did allocate.
    assert!(before > at_start);
}
