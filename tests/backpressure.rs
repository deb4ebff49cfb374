//! Backpressure: pushing 32 MiB into an upstream that does not read (then
//! reads slowly) must not grow tcplock's memory: it stops reading the client
//! when its buffer (or pipe) is full. Checked on both relay paths.
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn thirty_two_mib_into_a_slow_reader_keeps_rss_flat_when_copying() {
    push_into_a_slow_reader("off");
}

#[test]
fn thirty_two_mib_into_a_slow_reader_keeps_rss_flat_when_splicing() {
    push_into_a_slow_reader("auto");
}

fn push_into_a_slow_reader(splice: &str) {
    let total = 32 * MIB;
    let gate = Arc::new(AtomicBool::new(false));
    let up = Upstream::slow_sink(Arc::clone(&gate), 32 * KIB, Duration::from_millis(1));
    let proxy = Proxy::start(&["-u", &up.arg(), "--splice", splice]);
    let rss_start = proxy.rss_kib();

    let written = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut s = proxy.connect();
    set_timeouts(&s, Duration::from_secs(30));
    let (w, d) = (Arc::clone(&written), Arc::clone(&done));
    let client = thread::spawn(move || {
        let chunk = vec![0xA5u8; 64 * KIB];
        while w.load(Ordering::SeqCst) < total {
            s.write_all(&chunk).expect("client write");
            w.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        s.shutdown(Shutdown::Write).expect("shutdown(Write)");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read to EOF");
        d.store(true, Ordering::SeqCst);
    });

    // Phase 1: the upstream reads nothing. Wait until the client's writes
    // stall (no progress for 300 ms) or everything was swallowed.
    let mut last = 0;
    let mut last_change = Instant::now();
    let settled = wait_until(Duration::from_secs(15), || {
        let w = written.load(Ordering::SeqCst);
        if w != last {
            last = w;
            last_change = Instant::now();
        }
        w >= total || (w > 0 && last_change.elapsed() >= Duration::from_millis(300))
    });
    assert!(settled, "client writes neither stalled nor finished");
    let stalled_at = written.load(Ordering::SeqCst);
    let rss_stalled = proxy.rss_kib();
    let mut rss_max = rss_stalled;

    // Phase 2: the upstream reads slowly to the end; sample RSS meanwhile.
    gate.store(true, Ordering::SeqCst);
    let finished = wait_until(Duration::from_secs(40), || {
        rss_max = rss_max.max(proxy.rss_kib());
        done.load(Ordering::SeqCst)
    });
    eprintln!(
        "--splice {splice}: RSS start {rss_start} KiB, while stalled {rss_stalled} KiB, max {rss_max} KiB; \
         client stalled after {} KiB of {} KiB",
        stalled_at / KIB,
        total / KIB
    );
    assert!(
        rss_max < rss_start + 8 * 1024,
        "RSS grew from {rss_start} KiB to {rss_max} KiB (limit +8 MiB)"
    );
    assert!(
        stalled_at < total,
        "the client wrote all {total} bytes while the upstream read nothing: no backpressure"
    );
    assert!(
        finished,
        "transfer did not finish (upstream read {} bytes)",
        up.bytes_in()
    );
    client.join().expect("client thread");
    assert_eq!(
        up.bytes_in(),
        total as u64,
        "bytes that reached the upstream"
    );
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(num_field(&closed, "bytes_up"), total as u64, "{closed}");
}
