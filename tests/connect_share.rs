//! Each upstream address gets its share of the connect timeout: a first
//! address that never answers (a black hole) gives way to the next one in
//! time, instead of using up the whole `--connect-timeout`.

mod common;

use std::net::SocketAddr;

use common::*;

#[test]
fn a_black_holed_first_address_leaves_the_second_its_share_of_the_connect_timeout() {
    // The port the kernel picks on ::1 may be taken on 127.0.0.1 by another
    // test running at the same time: pick again, a bounded number of times.
    let mut attempts = 0;
    let (_hole, _filling, port, upstream) = loop {
        let (hole, filling) = black_hole();
        let port = hole.local_addr().expect("local_addr").port();
        match Upstream::echo_on(&SocketAddr::from(([127, 0, 0, 1], port)).to_string()) {
            Ok(upstream) => break (hole, filling, port, upstream),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 20 => {
                attempts += 1;
            }
            Err(e) => panic!("the echo stand-in on 127.0.0.1 with the black hole's port: {e}"),
        }
    };
    // getaddrinfo puts ::1 before 127.0.0.1: the black hole is tried first.
    let hosts = std::env::temp_dir().join(format!("tcplock-hosts-{}", std::process::id()));
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n::1 twoaddr\n127.0.0.1 twoaddr\n",
    )
    .expect("write the hosts file");
    let target = format!("twoaddr:{port}");
    let proxy = Proxy::start_with_hosts(&hosts, &["-u", &target, "--connect-timeout", "6s"]);
    let _ = std::fs::remove_file(&hosts);

    let mut client = proxy.connect();
    roundtrip(&mut client, b"through the second address");
    finish(client);
    proxy.expect_log(closed_with(1, "ok"), "closed conn=1 outcome=ok");
    assert_eq!(upstream.accepted(), 1);
}
