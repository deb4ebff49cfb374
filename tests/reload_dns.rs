//! SIGHUP looks the upstream up again every time, on a helper thread: a host
//! that moved under an unchanged name is found, and a slow resolver stalls
//! nobody. Names come from a private /etc/hosts (and, for the slow lookup, a
//! private /etc/resolv.conf naming a loopback "DNS server" that never
//! answers), bind-mounted for tcplock alone.

mod common;
mod hookkit;

use std::net::UdpSocket;
use std::path::Path;

use common::*;
use hookkit::*;

/// Rewrites `path` in place (same inode), so a bind mount of it sees the
/// new text.
fn rewrite(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("rewrite {}: {e}", path.display()));
}

/// An echo stand-in on 127.0.0.1 and one on 127.0.0.2, on the same port.
fn two_hosts_one_port() -> (Upstream, Upstream) {
    for _ in 0..20 {
        let first = Upstream::echo();
        if let Ok(second) = Upstream::echo_on(&format!("127.0.0.2:{}", first.port())) {
            return (first, second);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2 in 20 tries");
}

#[test]
fn sighup_looks_up_an_unchanged_upstream_name_again() {
    let (old_host, new_host) = two_hosts_one_port();
    let dir = TempDir::new("reload-moved");
    let hosts = dir.join("hosts");
    rewrite(&hosts, "127.0.0.1 localhost\n127.0.0.1 movinghost\n");
    let conf = dir.write_atomic(
        "tcplock.conf",
        &format!("upstream = movinghost:{}\n", old_host.port()),
    );
    let conf = conf.to_string_lossy().into_owned();
    let proxy = Proxy::start_with_hosts(&hosts, &["-c", &conf]);

    let mut client = proxy.connect();
    roundtrip(&mut client, b"before the move\n");
    finish(client);
    assert_eq!(old_host.accepted(), 1);

    // The host moves; the config file, name included, stays as it was.
    rewrite(&hosts, "127.0.0.1 localhost\n127.0.0.2 movinghost\n");
    proxy.signal("HUP");
    let reloaded = proxy.expect_log(event("reloaded"), "reloaded after SIGHUP");
    assert_eq!(
        field(&reloaded, "addresses").as_deref(),
        Some("1"),
        "{reloaded}"
    );

    let mut client = proxy.connect();
    roundtrip(&mut client, b"after the move\n");
    finish(client);
    assert_eq!(
        new_host.accepted(),
        1,
        "the moved host was not looked up again"
    );
    assert_eq!(old_host.accepted(), 1);
}

#[test]
fn relaying_goes_on_while_a_reload_waits_for_a_slow_lookup() {
    // A name server that takes every query and answers none: the lookup
    // waits for the resolver's timeout, 30 s, longer than a client's read
    // timeout, so a loop blocked in it cannot pass this test.
    let dns = UdpSocket::bind("127.0.0.153:53").expect("bind the stand-in name server");
    dns.set_read_timeout(Some(WAIT)).expect("read timeout");
    let upstream = Upstream::echo();
    let dir = TempDir::new("reload-slow-dns");
    let hosts = dir.join("hosts");
    rewrite(&hosts, "127.0.0.1 localhost\n127.0.0.1 slowname\n");
    let resolv = dir.join("resolv.conf");
    rewrite(
        &resolv,
        "nameserver 127.0.0.153\noptions timeout:30 attempts:1\n",
    );
    let conf = dir.write_atomic(
        "tcplock.conf",
        &format!("upstream = slowname:{}\n", upstream.port()),
    );
    let conf = conf.to_string_lossy().into_owned();
    let proxy = Proxy::start_with_etc(
        &[(&hosts, "/etc/hosts"), (&resolv, "/etc/resolv.conf")],
        &["-c", &conf],
    );

    let mut client = proxy.connect();
    roundtrip(&mut client, b"before the reload\n");

    // The reload names a host only DNS knows, and DNS is silent.
    dir.write_atomic(
        "tcplock.conf",
        &format!("upstream = dnsonly:{}\n", upstream.port()),
    );
    proxy.signal("HUP");
    let mut query = [0u8; 512];
    dns.recv_from(&mut query)
        .expect("the reload asked the name server within WAIT");

    roundtrip(&mut client, b"while the lookup hangs\n");
    let reloads =
        |p: &Proxy| p.count_logs(event("reloaded")) + p.count_logs(event("reload_failed"));
    assert_eq!(
        reloads(&proxy),
        0,
        "the lookup ended before the relay was served"
    );

    // More SIGHUPs meanwhile wait for the one in flight: one helper thread.
    for _ in 0..3 {
        proxy.signal("HUP");
    }
    proxy.signal("USR1");
    proxy.expect_log(event("state_summary"), "the state dump after the SIGHUPs");
    let threads = std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .expect("read /proc/PID/task")
        .count();
    assert_eq!(threads, 2, "the loop and one reload thread");

    roundtrip(&mut client, b"still relaying\n");
    finish(client);
    assert_eq!(reloads(&proxy), 0);
}
