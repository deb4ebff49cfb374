//! `--send-proxy v1|v2`: the upstream gets a PROXY protocol header (HAProxy's
//! `proxy-protocol.txt`) with the client's address and the local address it
//! reached, as its very first bytes, before anything the client sent (also
//! what it sent while queued). Checked byte for byte against the spec for
//! IPv4 and IPv6 clients, and against a real consumer: nginx's
//! `listen ... proxy_protocol` logging `$proxy_protocol_addr`.

mod common;

use std::io::Write;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;

const REQUEST: &[u8] = b"client bytes\n";

/// The v1 line the spec gives for a TCP connection from `src` to `dst`.
fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The v2 header the spec gives for a TCP connection from `src` to `dst`:
/// signature, version 2 + PROXY, family + STREAM, length, addresses, ports.
fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    let ip = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    if src.is_ipv4() {
        h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    } else {
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
    }
    h.extend(ip(src));
    h.extend(ip(dst));
    h.extend(src.port().to_be_bytes());
    h.extend(dst.port().to_be_bytes());
    h
}

/// The upstream records each whole request (to end of stream) and answers
/// "ok"; the client sends `REQUEST` and half-closes.
fn send_one(proxy: &Proxy) -> SocketAddr {
    let mut client = proxy.connect();
    let client_addr = client.local_addr().unwrap();
    client.write_all(REQUEST).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client).unwrap(), b"ok");
    client_addr
}

fn recorded(upstream: &Upstream) -> Vec<Vec<u8>> {
    upstream.stats().records.lock().unwrap().clone()
}

fn answering_ok() -> Upstream {
    Upstream::reply_after_eof(|_| b"ok".to_vec())
}

fn check_exact(listen: &str, version: &str, expected: fn(SocketAddr, SocketAddr) -> Vec<u8>) {
    let upstream = answering_ok();
    let proxy = Proxy::start_raw(&["-l", listen, "-u", &upstream.arg(), "--send-proxy", version]);
    let client = send_one(&proxy);
    let mut want = expected(client, proxy.addr());
    want.extend_from_slice(REQUEST);
    assert_eq!(recorded(&upstream), vec![want], "--send-proxy {version}");
    let closed = proxy.expect_log(outcome("ok"), "the client served");
    assert_eq!(
        num_field(&closed, "bytes_up"),
        REQUEST.len() as u64,
        "the header is not the client's: {closed}"
    );
}

/// Whether this host can listen on IPv6 loopback; the tests that need it
/// skip with a reason when it cannot.
fn ipv6_loopback() -> bool {
    match std::net::TcpListener::bind("[::1]:0") {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "IPv6 loopback unavailable under CI: {e}"
            );
            eprintln!("skipped: cannot listen on [::1] ({e})");
            false
        }
    }
}

#[test]
fn v1_header_for_an_ipv4_client_is_exact() {
    check_exact("127.0.0.1:0", "v1", v1);
}

#[test]
fn v2_header_for_an_ipv4_client_is_exact() {
    check_exact("127.0.0.1:0", "v2", v2);
}

#[test]
fn v1_header_for_an_ipv6_client_is_exact() {
    if ipv6_loopback() {
        check_exact("[::1]:0", "v1", v1);
    }
}

#[test]
fn v2_header_for_an_ipv6_client_is_exact() {
    if ipv6_loopback() {
        check_exact("[::1]:0", "v2", v2);
    }
}

#[test]
fn off_by_default_sends_only_the_clients_bytes() {
    let upstream = answering_ok();
    let proxy = Proxy::start(&["-u", &upstream.arg()]);
    send_one(&proxy);
    assert_eq!(recorded(&upstream), vec![REQUEST.to_vec()]);
}

/// What a client sent while it waited sits in the kernel before the
/// header is made: the header still goes first.
#[test]
fn the_header_goes_before_bytes_sent_while_queued() {
    let upstream = answering_ok();
    let proxy = Proxy::start(&["-u", &upstream.arg(), "--send-proxy", "v1"]);
    let mut holder = proxy.connect();
    proxy.expect_log(conn_event("activated", 1), "holder activated");
    let mut waiting = proxy.connect();
    let waiting_addr = waiting.local_addr().unwrap();
    waiting.write_all(REQUEST).unwrap();
    waiting.shutdown(Shutdown::Write).unwrap();
    holder.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut holder).unwrap(), b"ok");
    assert_eq!(read_to_eof(&mut waiting).unwrap(), b"ok");
    let mut want = v1(waiting_addr, proxy.addr());
    want.extend_from_slice(REQUEST);
    assert!(
        wait_until(WAIT, || recorded(&upstream).len() == 2),
        "both requests recorded"
    );
    assert_eq!(recorded(&upstream)[1], want);
}

/// A reload turns it on for the connections that start proxying after it.
#[test]
fn a_reload_switches_it_for_new_connections() {
    let dir = std::env::temp_dir().join(format!("tcplock-send-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tcplock.conf");
    let upstream = answering_ok();
    std::fs::write(&file, format!("upstream = {}\n", upstream.arg())).unwrap();
    let proxy = Proxy::start(&["-c", file.to_str().unwrap()]);
    send_one(&proxy);
    std::fs::write(
        &file,
        format!("upstream = {}\nsend-proxy = v2\n", upstream.arg()),
    )
    .unwrap();
    proxy.signal("HUP");
    proxy.expect_log(event("reloaded"), "reloaded");
    let client = send_one(&proxy);
    let mut want = v2(client, proxy.addr());
    want.extend_from_slice(REQUEST);
    assert_eq!(recorded(&upstream), vec![REQUEST.to_vec(), want]);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// nginx, a real consumer
// ---------------------------------------------------------------------------

/// nginx as a child of the test: no daemon, no master process, every path
/// in a temp dir. Killed on drop.
struct Nginx {
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn start_nginx(nginx: &str, dir: &Path, port: u16) -> Nginx {
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
           client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
           log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr \"$request\" $status';\n\
           access_log {d}/access.log pp;\n\
           server {{\n\
             listen 127.0.0.1:{port} proxy_protocol;\n\
             location / {{ return 200 \"hello\\n\"; }}\n\
           }}\n\
         }}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    Nginx { child }
}

fn nginx_sees_the_client(version: &str) {
    nginx_sees(version, None);
}

/// `balancer_header`: sent first by the client, to a tcplock started with
/// `--accept-proxy`; nginx must then see the client that header names.
fn nginx_sees(version: &str, balancer_header: Option<(&[u8], &str)>) {
    let Some(nginx) = nginx_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is missing under CI (.ci/run installs it)"
        );
        eprintln!("skipped: nginx is not installed (apt-get install nginx)");
        return;
    };
    // One directory per run: two tests with the same version run at once.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "tcplock-nginx-{version}-{}-{run}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = unused_port();
    let mut server = start_nginx(nginx, &dir, port);
    let up = format!("127.0.0.1:{port}");
    assert!(
        wait_until(WAIT, || TcpStream::connect(&up).is_ok()
            || server.child.try_wait().ok().flatten().is_some()),
        "nginx did not listen on {up}"
    );
    if let Ok(Some(status)) = server.child.try_wait() {
        let errors = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        panic!("nginx exited ({status}): {errors}");
    }
    // The readiness probe above came without a header; nginx logs it as a
    // broken header and closes it, which is not what is checked below.
    let mut args = vec!["-u", &up, "--send-proxy", version];
    if balancer_header.is_some() {
        args.push("--accept-proxy");
    }
    let proxy = Proxy::start(&args);
    let mut client = proxy.connect();
    let mut expected = client.local_addr().unwrap().to_string();
    if let Some((header, named)) = balancer_header {
        client.write_all(header).unwrap();
        expected = named.to_string();
    }
    client
        .write_all(b"GET /through-tcplock HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = String::from_utf8(read_to_eof(&mut client).unwrap()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let log = dir.join("access.log");
    let mut line = String::new();
    assert!(
        wait_until(WAIT, || {
            line = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains("/through-tcplock"))
                .unwrap_or_default()
                .to_string();
            !line.is_empty()
        }),
        "no access log line in {}",
        log.display()
    );
    eprintln!("nginx access log ({version}): {line}");
    assert!(
        line.starts_with(&format!("{expected} ")),
        "nginx saw {line:?}, client was {expected}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nginx_reads_the_client_address_from_a_v1_header() {
    nginx_sees_the_client("v1");
}

#[test]
fn nginx_reads_the_client_address_from_a_v2_header() {
    nginx_sees_the_client("v2");
}

/// Behind a balancer: the client its header names reaches nginx.
#[test]
fn nginx_reads_the_client_a_balancers_header_named() {
    nginx_sees(
        "v2",
        Some((
            b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 443\r\n",
            "203.0.113.7:4242",
        )),
    );
}
