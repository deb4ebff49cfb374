//! `--accept-proxy`: every client starts with a PROXY protocol header (v1 or
//! v2), as a balancer in front sends it. tcplock reads exactly the header
//! (what follows reaches the upstream intact), within 5 s of accept, before
//! the client joins the queue; the address in it is the client's everywhere
//! (`activated`, the state dump, the hook environment, a `--send-proxy`
//! header), the balancer's kept as `via=`. A missing, malformed, truncated,
//! oversized or slow header is `event=rejected reason=bad_proxy_header`
//! (outcome `rejected`); a `LOCAL` header is the balancer's own connection.

mod common;
mod hookkit;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use hookkit::*;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn v2_ipv4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

fn v2_local() -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

/// Sends `header` then `payload` in one write, and expects the echo of
/// `payload` alone: the header was consumed, nothing after it.
fn echoed_after(client: &mut TcpStream, header: &[u8], payload: &[u8]) {
    let mut all = header.to_vec();
    all.extend_from_slice(payload);
    client.write_all(&all).unwrap();
    assert_eq!(read_n(client, payload.len()).unwrap(), payload);
}

fn rejected(proxy: &Proxy, conn: u64) -> String {
    let line = proxy.expect_log(conn_event("rejected", conn), "rejected for its header");
    assert_eq!(
        field(&line, "reason").as_deref(),
        Some("bad_proxy_header"),
        "{line}"
    );
    proxy.expect_log(closed_with(conn, "rejected"), "closed as rejected");
    line
}

#[test]
fn a_v1_header_names_the_client_everywhere_and_only_it_is_consumed() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--accept-proxy"]);
    let mut client = proxy.connect();
    let balancer = client.local_addr().unwrap();
    echoed_after(
        &mut client,
        b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 443\r\n",
        b"PROXY lookalike bytes after the header\n",
    );
    let activated = proxy.expect_log(conn_event("activated", 1), "activated");
    assert_eq!(
        field(&activated, "client").as_deref(),
        Some("203.0.113.7:4242"),
        "{activated}"
    );
    assert_eq!(
        field(&activated, "via"),
        Some(balancer.to_string()),
        "{activated}"
    );
    proxy.signal("USR1");
    let state = proxy.expect_log(conn_event("state", 1), "state dump");
    assert_eq!(
        field(&state, "client").as_deref(),
        Some("203.0.113.7:4242"),
        "{state}"
    );
    finish(client);
}

#[test]
fn a_v2_header_names_the_client_in_hooks_and_in_a_forwarded_header() {
    let dir = TempDir::new("accept-proxy-hook");
    let hook = dir.script("hook.sh", &dump_env_to("env.$TCPLOCK_CONN_ID"));
    let upstream = Upstream::reply_after_eof(|_| b"ok".to_vec());
    let proxy = Proxy::start(&[
        "-u",
        &upstream.arg(),
        "--accept-proxy",
        "--send-proxy",
        "v1",
        "--on-activate",
        &hook,
        "--log-level",
        "debug",
    ]);
    let mut client = proxy.connect();
    let balancer = client.local_addr().unwrap();
    let mut all = v2_ipv4([198, 51, 100, 9], 5555, [192, 0, 2, 1], 80);
    all.extend_from_slice(b"request");
    client.write_all(&all).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client).unwrap(), b"ok");
    let accepted = proxy.expect_log(conn_event("accepted", 1), "accepted");
    assert_eq!(
        field(&accepted, "client").as_deref(),
        Some("198.51.100.9:5555"),
        "{accepted}"
    );
    assert_eq!(
        field(&accepted, "via"),
        Some(balancer.to_string()),
        "{accepted}"
    );
    let env = dir.env_file("env.1");
    assert_eq!(
        env.get("TCPLOCK_CLIENT_ADDR").map(String::as_str),
        Some("198.51.100.9:5555")
    );
    let want = format!(
        "PROXY TCP4 198.51.100.9 127.0.0.1 5555 {}\r\nrequest",
        proxy.port()
    );
    let records = upstream.stats().records.lock().unwrap().clone();
    assert_eq!(records, vec![want.into_bytes()]);
}

#[test]
fn a_local_header_is_served_as_the_balancers_own_connection() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--accept-proxy"]);
    let mut client = proxy.connect();
    let balancer = client.local_addr().unwrap();
    echoed_after(&mut client, &v2_local(), b"health check\n");
    echoed_after(&mut client, b"", b"more\n");
    let activated = proxy.expect_log(conn_event("activated", 1), "activated");
    assert_eq!(
        field(&activated, "client"),
        Some(balancer.to_string()),
        "{activated}"
    );
    assert_eq!(field(&activated, "via"), None, "{activated}");
    finish(client);
    proxy.expect_log(closed_with(1, "ok"), "served");
}

/// Each bad header is rejected and closed without reaching the upstream;
/// a good client behind them is served (they never held its place).
#[test]
fn missing_truncated_oversized_and_garbage_headers_are_rejected() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--accept-proxy"]);
    let mut oversized = b"PROXY TCP4 ".to_vec();
    oversized.resize(300, b'1');
    let mut oversized_v2 = V2_SIGNATURE.to_vec();
    oversized_v2.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
    let cases: [(&str, &[u8], bool); 6] = [
        ("missing", b"", true),
        ("truncated v1", b"PROXY TCP4 203.0.113.7 19", true),
        (
            "truncated v2",
            &v2_ipv4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2)[..20],
            true,
        ),
        ("oversized v1", &oversized, false),
        ("oversized v2", &oversized_v2, false),
        ("garbage", b"GET / HTTP/1.0\r\n\r\n", false),
    ];
    for (i, (what, bytes, then_eof)) in cases.iter().enumerate() {
        let conn = i as u64 + 1;
        let mut client = proxy.connect();
        client.write_all(bytes).unwrap();
        if *then_eof {
            client.shutdown(Shutdown::Write).unwrap();
        }
        let line = rejected(&proxy, conn);
        assert!(
            expect_closed(&mut client, WAIT).is_ok(),
            "{what}: still open after {line}"
        );
    }
    assert_eq!(upstream.accepted(), 0, "a bad header reached the upstream");
    let mut good = proxy.connect();
    echoed_after(&mut good, b"PROXY UNKNOWN\r\n", b"fine\n");
    finish(good);
}

#[test]
fn a_header_slower_than_5s_is_rejected() {
    let upstream = Upstream::echo();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--accept-proxy"]);
    let started = Instant::now();
    let mut client = proxy.connect();
    client.write_all(b"PROXY TCP4 203.0.113.7 ").unwrap();
    let line = proxy
        .wait_for_log(conn_event("rejected", 1), Duration::from_secs(20))
        .expect("the slow header rejected");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(4_900),
        "rejected after {waited:?}: {line}"
    );
    rejected(&proxy, 1);
    assert!(expect_closed(&mut client, WAIT).is_ok());
}

#[test]
fn a_reload_keeps_accept_proxy_as_it_was() {
    let dir = TempDir::new("accept-proxy-reload");
    let upstream = Upstream::echo();
    let file = dir.write_atomic(
        "tcplock.conf",
        &format!("upstream = {}\naccept-proxy = on\n", upstream.arg()),
    );
    let proxy = Proxy::start(&["-c", file.to_str().unwrap()]);
    dir.write_atomic("tcplock.conf", &format!("upstream = {}\n", upstream.arg()));
    proxy.signal("HUP");
    let ignored = proxy.expect_log(event("reload_ignored"), "accept-proxy kept");
    assert!(ignored.contains("accept-proxy"), "{ignored}");
    let mut client = proxy.connect();
    echoed_after(
        &mut client,
        b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\n",
        b"x\n",
    );
    finish(client);
}
