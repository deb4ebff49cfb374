//! Integrity: a deterministic pseudo-random stream pushed through the proxy
//! to an echo upstream comes back byte for byte, in both directions at once.
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

/// Writes `total` bytes of the seed's stream on one thread while reading the
/// echo on another; returns the number of bytes checked.
fn pump_and_check(proxy: &Proxy, total: usize, seed: u64) -> usize {
    let s = proxy.connect();
    let mut w = s.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let mut p = Prng::new(seed);
        let mut sent = 0;
        while sent < total {
            let chunk = p.next_bytes((total - sent).min(64 * KIB));
            w.write_all(chunk).expect("write stream");
            sent += chunk.len();
        }
        w.shutdown(Shutdown::Write).expect("shutdown(Write)");
    });
    let mut r = s;
    let mut check = Prng::new(seed);
    let mut buf = vec![0u8; 64 * KIB];
    let mut got = 0usize;
    loop {
        let n = r.read(&mut buf).expect("read echo");
        if n == 0 {
            break;
        }
        if let Some(i) = check.check(&buf[..n]) {
            panic!("echoed stream differs at byte {}", got + i);
        }
        got += n;
        assert!(got <= total, "more bytes back than sent");
    }
    writer.join().expect("writer thread");
    got
}

#[test]
fn sixty_four_mib_both_directions_at_once() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg()]);
    let total = 64 * MIB;
    let start = Instant::now();
    let got = pump_and_check(&proxy, total, 0x5eed_1234);
    let took = start.elapsed();
    assert_eq!(got, total, "bytes echoed");
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(num_field(&closed, "bytes_up"), total as u64, "{closed}");
    assert_eq!(num_field(&closed, "bytes_down"), total as u64, "{closed}");
    assert!(
        took < Duration::from_secs(40),
        "64 MiB each way took {took:?}"
    );
    eprintln!("64 MiB each way through tcplock in {took:?}");
}

#[test]
fn tiny_buffer_size_still_relays_exactly() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "--buffer-size", "1k"]);
    let total = 4 * MIB + 17;
    assert_eq!(pump_and_check(&proxy, total, 42), total);
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(num_field(&closed, "bytes_up"), total as u64, "{closed}");
}
