//! `--metrics ADDR`: Prometheus metrics over HTTP on the proxy's own loop.
//! The exposition is parsed by a real parser (the Python `prometheus_client`
//! package, Debian's `python3-prometheus-client`) and its values checked
//! against a known scenario; the tiny HTTP server's answers, keep-alive, the
//! head timeout and the connection limit are checked on the wire.

mod common;
mod hookkit;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use hookkit::TempDir;

/// Starts tcplock with `--metrics 127.0.0.1:0` and `args`; returns it and
/// where its metrics are served.
fn start(args: &[&str]) -> (Proxy, SocketAddr) {
    let mut full = vec!["--metrics", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let proxy = Proxy::start(&full);
    let addr = metrics_addr(&proxy);
    (proxy, addr)
}

fn metrics_addr(proxy: &Proxy) -> SocketAddr {
    let line = proxy.expect_log(event("metrics_listening"), "event=metrics_listening");
    field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line}"))
}

/// One HTTP response: status code, head (lower-cased header names) and body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (head, then `Content-Length` bytes of body unless
/// `head_only`) without reading past it.
fn read_response(s: &mut TcpStream, head_only: bool) -> io::Result<Response> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
        assert!(head.len() < 64 * 1024, "response head too long");
    }
    let text = String::from_utf8(head).expect("response head is UTF-8");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
    let status = status_line[9..12].parse().expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().expect("Content-Length"))
        .expect("a Content-Length header");
    let body = if head_only {
        Vec::new()
    } else {
        read_n(s, len)?
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut s = connect(addr);
    s.write_all(raw.as_bytes()).expect("write request");
    read_response(&mut s, raw.starts_with("HEAD ")).expect("read response")
}

/// A scrape on a kept-alive connection.
fn scrape_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .expect("write");
    let r = read_response(s, false).expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    String::from_utf8(r.body).expect("metrics are UTF-8")
}

fn scrape(addr: SocketAddr) -> String {
    let r = request(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{r:?}");
    String::from_utf8(r.body).expect("metrics are UTF-8")
}

const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        print("%s %s{%s} %r" % (family.type, s.name, labels, s.value))
"#;

/// Samples by `name{label="v",...}` (labels sorted), parsed by
/// `prometheus_client`; also checks every family has a known type.
fn parse(python: &str, text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in run_parser(python, PARSE, text).lines() {
        let mut parts = line.splitn(3, ' ');
        let (kind, name, value) = (parts.next(), parts.next(), parts.next());
        let (Some(kind), Some(name), Some(value)) = (kind, name, value) else {
            panic!("parser line {line:?}");
        };
        assert!(
            ["gauge", "counter", "histogram"].contains(&kind),
            "{name} has type {kind}"
        );
        let name = name.strip_suffix("{}").unwrap_or(name);
        samples.insert(name.to_owned(), value.parse().expect("sample value"));
    }
    samples
}

fn sample(samples: &HashMap<String, f64>, name: &str) -> f64 {
    *samples
        .get(name)
        .unwrap_or_else(|| panic!("no sample {name}; have {:?}", samples.keys()))
}

#[test]
fn the_exposition_parses_and_counts_a_known_scenario() {
    let Some(python) = prometheus_parser() else {
        return;
    };
    let up = Upstream::echo();
    let (proxy, metrics) = start(&[
        "-u",
        &up.arg(),
        "-n",
        "1",
        "--max-queue",
        "2",
        "--log-level",
        "debug",
    ]);
    let holder = holding(&proxy);
    let mut queued = Vec::new();
    let head_connecting = Instant::now();
    let mut head_accepted = None;
    for (i, conn) in [(b"b\n", 2), (b"c\n", 3)] {
        let mut client = proxy.connect();
        client.write_all(i).expect("write");
        proxy.expect_log(conn_event("accepted", conn), "accepted");
        head_accepted.get_or_insert_with(Instant::now);
        queued.push(client);
    }
    let head_accepted = head_accepted.expect("the head was accepted");
    let mut rejected = proxy.connect();
    expect_closed(&mut rejected, WAIT).expect("the fourth client is rejected");
    proxy.expect_log(closed_with(4, "rejected"), "closed conn=4 outcome=rejected");

    // Kept open, so the descriptors counted at the scrape are still open
    // when the test counts them.
    let mut scraper = connect(metrics);
    // Let the head's wait grow well past the clock's millisecond steps.
    wait_until(WAIT, || {
        head_accepted.elapsed() >= Duration::from_millis(300)
    });
    let waited_at_least = head_accepted.elapsed().as_secs_f64();
    let text = scrape_on(&mut scraper);
    let waited_at_most = head_connecting.elapsed().as_secs_f64();
    let samples = parse(python, &text);
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .expect("/proc/PID/fd")
        .count();
    assert_eq!(sample(&samples, "process_open_fds"), open_fds as f64);
    assert_eq!(sample(&samples, "tcplock_queued_connections"), 2.0);
    assert_eq!(sample(&samples, "tcplock_active_connections"), 1.0);
    assert_eq!(sample(&samples, "tcplock_permits"), 1.0);
    assert_eq!(sample(&samples, "tcplock_paused"), 0.0);
    let oldest = sample(&samples, "tcplock_oldest_wait_seconds");
    assert!(
        oldest >= waited_at_least - 0.002 && oldest <= waited_at_most + 0.002,
        "oldest wait {oldest} s, the head waited between {waited_at_least} and {waited_at_most} s"
    );
    assert_eq!(
        sample(
            &samples,
            r#"tcplock_rejected_connections_total{reason="queue_full"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, r#"tcplock_connections_total{outcome="rejected"}"#),
        1.0
    );
    assert_eq!(sample(&samples, "tcplock_queue_wait_seconds_count"), 1.0);
    // The holder's round trip is counted while it is still relaying.
    assert_eq!(
        sample(&samples, r#"tcplock_bytes_total{direction="up"}"#),
        8.0
    );
    assert_eq!(
        sample(&samples, r#"tcplock_bytes_total{direction="down"}"#),
        8.0
    );
    assert_eq!(
        sample(&samples, r#"tcplock_upstream_up{instance="1"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            r#"tcplock_upstream_state{instance="1",state="ready"}"#
        ),
        1.0
    );
    assert!(sample(&samples, "process_resident_memory_bytes") > 0.0);
    assert!(sample(&samples, "process_max_fds") >= sample(&samples, "process_open_fds"));
    assert!(sample(&samples, "process_start_time_seconds") > 1.6e9);
    let version = format!(
        r#"tcplock_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&samples, &version), 1.0);

    finish(holder);
    for (mut client, msg) in queued.into_iter().zip([b"b\n", b"c\n"]) {
        assert_eq!(read_n(&mut client, 2).expect("served"), msg);
        finish(client);
    }
    proxy.expect_log(closed_with(3, "ok"), "closed conn=3 outcome=ok");
    let samples = parse(python, &scrape(metrics));
    assert_eq!(sample(&samples, "tcplock_queued_connections"), 0.0);
    assert_eq!(sample(&samples, "tcplock_active_connections"), 0.0);
    assert_eq!(sample(&samples, "tcplock_oldest_wait_seconds"), 0.0);
    assert_eq!(
        sample(&samples, r#"tcplock_connections_total{outcome="ok"}"#),
        3.0
    );
    assert_eq!(sample(&samples, "tcplock_queue_wait_seconds_count"), 3.0);
    assert_eq!(
        sample(&samples, r#"tcplock_queue_wait_seconds_bucket{le="+Inf"}"#),
        3.0
    );
    assert_eq!(
        sample(&samples, "tcplock_connection_duration_seconds_count"),
        3.0
    );
    assert_eq!(
        sample(&samples, r#"tcplock_bytes_total{direction="up"}"#),
        12.0
    );
    assert_eq!(
        sample(&samples, r#"tcplock_bytes_total{direction="down"}"#),
        12.0
    );
}

#[test]
fn hook_runs_are_counted_by_hook_and_result() {
    let Some(python) = prometheus_parser() else {
        return;
    };
    let up = Upstream::echo();
    let (proxy, metrics) = start(&["-u", &up.arg(), "--on-activate", "true"]);
    for _ in 0..2 {
        let mut client = proxy.connect();
        roundtrip(&mut client, b"x\n");
        finish(client);
    }
    proxy.expect_log(closed_with(2, "ok"), "closed conn=2 outcome=ok");
    let samples = parse(python, &scrape(metrics));
    assert_eq!(
        sample(
            &samples,
            r#"tcplock_hook_runs_total{hook="activate",result="ok"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &samples,
            r#"tcplock_hook_runs_total{hook="activate",result="failed"}"#
        ),
        0.0
    );
    assert_eq!(sample(&samples, "tcplock_hook_duration_seconds_count"), 2.0);
}

#[test]
fn other_paths_methods_and_malformed_requests_get_404_405_400() {
    let (_proxy, metrics) = start(&["-u", "127.0.0.1:9"]);
    let ok = request(metrics, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let head = request(metrics, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").is_some_and(|l| l != "0"));
    assert_eq!(request(metrics, "GET / HTTP/1.1\r\n\r\n").status, 404);
    assert_eq!(
        request(metrics, "GET /metricsx HTTP/1.1\r\n\r\n").status,
        404
    );
    let post = request(
        metrics,
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    for garbage in [
        "hello\r\n\r\n",
        "GET /metrics HTTP/9.9\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    ] {
        let mut s = connect(metrics);
        s.write_all(garbage.as_bytes()).expect("write");
        let r = read_response(&mut s, false).expect("a response");
        assert_eq!(r.status, 400, "{garbage:?}");
        assert_eq!(r.header("connection"), Some("close"));
        expect_closed(&mut s, WAIT).expect("closed after a 400");
    }
    // A head over 8 KiB is refused, and the connection closed.
    let mut s = connect(metrics);
    let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    let _ = s.write_all(long.as_bytes());
    let r = read_response(&mut s, false).expect("a response");
    assert_eq!(r.status, 431);
    expect_closed(&mut s, WAIT).expect("closed after a 431");
}

#[test]
fn keep_alive_serves_requests_until_the_client_says_close() {
    let (_proxy, metrics) = start(&["-u", "127.0.0.1:9"]);
    let mut s = connect(metrics);
    // Two requests, the second pipelined in the same write, then a 404 and
    // a third after it: all on one connection.
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
        .expect("write");
    for _ in 0..2 {
        let r = read_response(&mut s, false).expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
    }
    s.write_all(b"GET /nope HTTP/1.1\r\n\r\n").expect("write");
    assert_eq!(read_response(&mut s, false).expect("404").status, 404);
    s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    assert_eq!(read_response(&mut s, false).expect("last").status, 200);
    expect_closed(&mut s, WAIT).expect("closed after Connection: close");

    // HTTP/1.0 closes unless asked to keep the connection.
    let mut s = connect(metrics);
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("write");
    assert_eq!(read_response(&mut s, false).expect("1.0").status, 200);
    expect_closed(&mut s, WAIT).expect("HTTP/1.0 closed");
    let mut s = connect(metrics);
    for _ in 0..2 {
        s.write_all(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .expect("write");
        let r = read_response(&mut s, false).expect("1.0 keep-alive");
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn a_client_that_never_finishes_its_head_is_closed_after_5_s() {
    let (_proxy, metrics) = start(&["-u", "127.0.0.1:9"]);
    let t = Instant::now();
    let mut slow = connect(metrics);
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost:")
        .expect("write");
    // Meanwhile the loop serves everyone else.
    assert_eq!(
        request(metrics, "GET /metrics HTTP/1.1\r\n\r\n").status,
        200
    );
    let (_, data) = expect_closed(&mut slow, Duration::from_secs(20)).expect("closed");
    let took = t.elapsed();
    assert!(data.is_empty(), "no response expected, got {data:?}");
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
}

#[test]
fn a_seventeenth_connection_is_turned_away_and_the_sixteen_are_served() {
    let (_proxy, metrics) = start(&["-u", "127.0.0.1:9"]);
    // Sixteen connections, each with half a request head sent.
    let mut open: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = connect(metrics);
            s.write_all(b"GET /metrics HTTP/1.1\r\n").expect("write");
            s
        })
        .collect();
    let mut extra = connect(metrics);
    // Well before the 5 s head timeout could have closed it.
    let (_, data) = expect_closed(&mut extra, Duration::from_secs(4)).expect("the 17th is closed");
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("HTTP/1.1 503 "), "the 17th got {text:?}");
    // The sixteen are still served.
    for s in &mut open {
        s.write_all(b"Connection: close\r\n\r\n").expect("write");
        assert_eq!(read_response(s, false).expect("served").status, 200);
    }
    for mut s in open {
        expect_closed(&mut s, WAIT).expect("closed after the response");
    }
    // Their slots are free again.
    assert_eq!(
        request(metrics, "GET /metrics HTTP/1.1\r\n\r\n").status,
        200
    );
}

#[test]
fn the_config_file_key_serves_metrics_and_a_taken_address_is_a_clear_error() {
    let dir = TempDir::new("metrics-conf");
    let path = dir.write_atomic(
        "tcplock.conf",
        "upstream = 127.0.0.1:9\nmetrics = 127.0.0.1:0\n",
    );
    let path = path.to_string_lossy().into_owned();
    let proxy = Proxy::start(&["-c", &path]);
    let metrics = metrics_addr(&proxy);
    assert_eq!(
        request(metrics, "GET /metrics HTTP/1.1\r\n\r\n").status,
        200
    );

    let taken = metrics.to_string();
    let out = run(
        &[
            "-l",
            "127.0.0.1:0",
            "-u",
            "127.0.0.1:9",
            "--metrics",
            &taken,
        ],
        WAIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&taken), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn the_library_builder_serves_metrics_and_refuses_a_bad_address() {
    let up = Upstream::echo();
    let port = unused_port();
    // A port alone means loopback, as for the listen address.
    let lock = quiet_lock(&up)
        .metrics(&port.to_string())
        .build()
        .expect("build");
    let handle = lock.handle();
    let runner = std::thread::spawn(move || lock.run().expect("runs until stopped"));
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(
        request(metrics, "GET /metrics HTTP/1.1\r\n\r\n").status,
        200
    );
    handle.stop();
    assert!(wait_until(WAIT, || runner.is_finished()), "run() returned");

    let error = quiet_lock(&up)
        .metrics("not an address")
        .build()
        .err()
        .expect("a bad metrics address is refused");
    assert!(error.to_string().contains("metrics"), "{error}");
}

#[test]
fn open_fds_match_proc_with_control_connections_open() {
    let dir = TempDir::new("metrics-fds");
    let sock = dir.join("ctl.sock");
    let upstream = Upstream::echo();
    let (proxy, metrics) = start(&[
        "-u",
        &upstream.arg(),
        "--control",
        sock.to_str().expect("utf-8 path"),
    ]);
    let count = || {
        std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
            .expect("/proc/PID/fd")
            .count()
    };
    let mut scraper = connect(metrics);
    scrape_on(&mut scraper);
    let before = count();
    let sessions: Vec<_> = (0..10)
        .map(|_| {
            let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect control");
            s.write_all(b"stat").expect("half a command");
            s
        })
        .collect();
    assert!(
        wait_until(WAIT, || count() >= before + 10),
        "the control connections were not accepted"
    );
    let text = scrape_on(&mut scraper);
    let open_fds: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_open_fds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no process_open_fds in {text}"));
    assert_eq!(open_fds, count() as f64);
    drop(sessions);
}
