//! Integrity: a deterministic pseudo-random stream pushed through the proxy
//! to an echo upstream comes back byte for byte, in both directions at once,
//! in every relay mode; and `--splice auto` splices bulk streams only.
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

/// Starts tcplock with `args` in front of an echo upstream, pushes `total`
/// bytes of the seed's stream through one connection, and checks they come
/// back whole and that the closed line counts them both ways.
fn echo_exactly(args: &[&str], total: usize, seed: u64) {
    let up = Upstream::echo();
    let upstream = up.arg();
    let mut full = vec!["-u", &upstream];
    full.extend_from_slice(args);
    let proxy = Proxy::start(&full);
    assert_eq!(pump_and_check(&proxy, total, seed), total, "bytes echoed");
    let closed = proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(num_field(&closed, "bytes_up"), total as u64, "{closed}");
    assert_eq!(num_field(&closed, "bytes_down"), total as u64, "{closed}");
}

#[test]
fn sixty_four_mib_both_directions_at_once() {
    let start = Instant::now();
    echo_exactly(&[], 64 * MIB, 0x5eed_1234);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "64 MiB each way took {took:?}"
    );
    eprintln!("64 MiB each way through tcplock in {took:?}");
}

#[test]
fn copy_mode_relays_64_mib_both_ways_exactly() {
    echo_exactly(&["--splice", "off"], 64 * MIB + 5, 0x5eed_c0b7);
}

#[test]
fn auto_mode_copies_small_exchanges() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg()]);
    let at_start = proxy.open_pipes();
    let mut s = proxy.connect();
    for i in 0..200u32 {
        roundtrip(
            &mut s,
            format!("message {i} of a small exchange").as_bytes(),
        );
    }
    finish(s);
    proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(proxy.open_pipes(), at_start, "small exchanges took a pipe");
}

#[test]
fn auto_mode_splices_a_stream_that_fills_the_buffer_and_off_never_does() {
    for (mode, expect_splice) in [("auto", true), ("off", false)] {
        let up = Upstream::echo();
        let proxy = Proxy::start(&["-u", &up.arg(), "--splice", mode]);
        let at_start = proxy.open_pipes();
        let total = 4 * MIB + 11;
        assert_eq!(pump_and_check(&proxy, total, 7), total, "--splice {mode}");
        proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
        let spliced = proxy.open_pipes() > at_start;
        assert_eq!(spliced, expect_splice, "--splice {mode}: pipes taken");
    }
}

/// Where the kernel or a seccomp filter refuses splice (here strace fails
/// every splice call with EPERM), the default --splice auto copies instead:
/// streams arrive whole and the refusal is logged once, not per connection.
#[test]
fn refused_splice_falls_back_to_copying() {
    let up = Upstream::echo();
    let mut proxy = Proxy::start_injecting("splice:error=EPERM", &["-u", &up.arg()]);
    for (conn, seed) in [(1, 0x5eed_0001), (2, 0x5eed_0002)] {
        let total = 4 * MIB + 3;
        assert_eq!(pump_and_check(&proxy, total, seed), total, "conn {conn}");
        let closed = proxy.expect_log(closed_with(conn, "ok"), "closed outcome=ok");
        assert_eq!(num_field(&closed, "bytes_down"), total as u64, "{closed}");
    }
    let refusals = proxy.matching(event("splice_refused"));
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("level=warn"), "{}", refusals[0]);
    assert!(
        proxy.stop(WAIT).is_some(),
        "tcplock under strace did not stop"
    );
}

#[test]
fn tiny_buffer_size_still_relays_exactly() {
    echo_exactly(&["--buffer-size", "1k"], 4 * MIB + 17, 42);
}

#[test]
fn splice_mode_relays_64_mib_both_ways_exactly() {
    echo_exactly(&["--splice", "on"], 64 * MIB + 3, 0x5eed_5911);
}

#[test]
fn splice_mode_with_small_pipes_and_many_connections_in_turn() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "--splice", "on", "--buffer-size", "4k"]);
    for (i, seed) in (0..5u64).enumerate() {
        let total = MIB + i * 4099;
        assert_eq!(pump_and_check(&proxy, total, seed), total, "connection {i}");
    }
    assert!(
        proxy.wait_for_count(outcome("ok"), 5, WAIT),
        "five ok closes"
    );
}

/// A one-way flood keeps the pipe partly full: a splice into it that answers
/// EAGAIN for lack of pipe room must not be taken for an empty socket, or the
/// rest of the stream waits for a readiness edge that never comes.
#[test]
fn splice_mode_delivers_a_one_way_flood_to_the_end() {
    const TOTAL: usize = 256 * MIB;
    let source = Upstream::spawn(|mut s, _active| {
        let chunk = vec![0x7e_u8; 64 * KIB];
        let mut left = TOTAL;
        while left > 0 {
            let n = left.min(chunk.len());
            if s.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n;
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = read_to_eof(&mut s);
    });
    let proxy = Proxy::start(&["-u", &source.arg(), "--splice", "on"]);
    let mut client = proxy.connect();
    let mut buf = vec![0u8; 64 * KIB];
    let mut got = 0;
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("stalled after {got} of {TOTAL} bytes: {e}"),
        }
    }
    assert_eq!(got, TOTAL);
}
