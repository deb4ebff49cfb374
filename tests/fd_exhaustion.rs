//! Out of file descriptors: tcplock gives up its idle pipes, then stops
//! accepting until a connection closes, does not spin meanwhile, and serves
//! every client once descriptors free up.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// One client takes the permit and 40 more queue behind it, more than the
/// descriptor limit leaves room for: tcplock must pause accepting.
fn connect_until_accepting_pauses(proxy: &Proxy) -> (TcpStream, Vec<TcpStream>) {
    let mut first = proxy.connect();
    roundtrip(&mut first, b"holding the permit");
    let waiting: Vec<_> = (0..40).map(|_| proxy.connect()).collect();
    proxy.expect_log(
        event("accept_paused"),
        "accept_paused once descriptors run out",
    );
    (first, waiting)
}

/// Ends the permit holder's connection, then expects every waiting client
/// to be served in turn, `ok_total` clean closes in all.
fn serve_all_after(proxy: &Proxy, first: TcpStream, mut waiting: Vec<TcpStream>, ok_total: usize) {
    drop(first);
    for (i, client) in waiting.iter_mut().enumerate() {
        roundtrip(client, format!("client {i}").as_bytes());
        // Closing frees descriptors for the clients still in the backlog.
        client.shutdown(std::net::Shutdown::Both).expect("shutdown");
    }
    assert!(
        proxy.wait_for_count(outcome("ok"), ok_total, WAIT),
        "all {ok_total} served"
    );
}

#[test]
fn emfile_pauses_accepting_without_spinning_and_every_client_is_served() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start_with_fd_limit(32, &["-u", &upstream.arg(), "--max-queue", "500"]);

    let (first, waiting) = connect_until_accepting_pauses(&proxy);

    // Paused means idle: measured over a fixed window (a measurement, not a
    // wait for something to happen), the loop burns next to no CPU.
    let before = cpu_ticks(proxy.pid());
    std::thread::sleep(Duration::from_millis(500));
    let spent = cpu_ticks(proxy.pid()) - before;
    assert!(
        spent <= 10,
        "{spent} ticks of CPU in 500 ms while paused: spinning"
    );

    serve_all_after(&proxy, first, waiting, 41);
    assert_eq!(upstream.max_concurrent(), 1);
}

/// Idle pipes kept for reuse are descriptors no client is using: when
/// accepting runs out of descriptors, tcplock closes them before it pauses.
#[test]
fn idle_pipes_are_given_up_before_accepting_pauses() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start_with_fd_limit(32, &["-u", &upstream.arg(), "--max-queue", "500"]);
    let at_start = proxy.open_pipes();

    // Writes that fill whole buffers make the default --splice auto splice,
    // and the emptied pipes stay in the pool.
    let mut bulk = proxy.connect();
    let chunk = vec![0x5a_u8; 64 * KIB];
    for _ in 0..4 {
        roundtrip(&mut bulk, &chunk);
    }
    finish(bulk);
    proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert!(
        proxy.open_pipes() > at_start,
        "the bulk exchange left no pipe in the pool"
    );

    let (first, waiting) = connect_until_accepting_pauses(&proxy);
    assert_eq!(
        proxy.open_pipes(),
        at_start,
        "idle pipes kept open while accepting is paused"
    );

    serve_all_after(&proxy, first, waiting, 42);
}
