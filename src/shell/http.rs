//! A tiny HTTP/1.1 server on the loop, for `--metrics`: `GET /metrics`
//! (and `HEAD`), 404 for other paths, 405 for other methods, 400 for a
//! malformed request, 431 for a head over [`HEAD_MAX`].
//!
//! It never blocks the loop: every socket is non-blocking, a response is
//! written as the client reads it, and every wait has a deadline the loop
//! folds into its poll timeout. A client has [`IO_TIMEOUT_MS`] to send a
//! whole request head (counted from connecting, or from the end of the
//! previous response) and to take each part of a response; at most
//! [`MAX_CONNS`] are served at once, one more is answered 503 and closed.
//! Keep-alive is honoured: HTTP/1.1 keeps the connection unless the client
//! says `Connection: close`; HTTP/1.0 closes it unless it says
//! `Connection: keep-alive`. Requests with a body are answered, then
//! closed, since bodies are not read.
//!
//! A response is built in one buffer the server reuses and written straight
//! out; only the part a slow client did not take yet is copied into a
//! buffer of its connection.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

/// Connections served at once.
pub(super) const MAX_CONNS: usize = 16;
/// Longest request head, request line and headers.
pub(super) const HEAD_MAX: usize = 8 * 1024;
/// How long a client may take to send a request head, and to take the next
/// part of a response.
pub(super) const IO_TIMEOUT_MS: u64 = 5_000;
/// Connections accepted per loop turn; more wait for the next turn.
const ACCEPT_BATCH: usize = 32;
/// Requests answered on one connection per loop turn; a client that
/// pipelines more is served on the next turn.
const REQUESTS_PER_TURN: usize = 8;
/// Room kept before the body for the status line and headers, which are
/// written once the body's length is known.
const HEAD_ROOM: usize = 256;

/// What answers a request for `/metrics`: appends the body to the buffer.
pub(super) type Render<'a> = dyn FnMut(&mut Vec<u8>) + 'a;

/// The listener and its connections.
pub(super) struct HttpServer {
    listener: TcpListener,
    /// The token of connection `i` is `first_token + i`.
    first_token: usize,
    conns: Vec<Option<HttpConn>>,
    /// Where responses are built; reused, so a scrape allocates nothing once
    /// it has grown to the size of one.
    scratch: Vec<u8>,
    /// The listener may hold more connections than the last batch took.
    accept_more: bool,
    /// Connections to serve at the next [`HttpServer::turn`]: readiness
    /// came, or they stopped at [`REQUESTS_PER_TURN`] with requests left.
    ready: u32,
}

struct HttpConn {
    stream: TcpStream,
    /// Bytes of the request head being read (and any pipelined after it).
    head: Vec<u8>,
    /// The part of a response the client has not taken yet.
    out: Vec<u8>,
    written: usize,
    /// When the connection is closed unless it makes progress.
    deadline: u64,
    /// Close once `out` is written.
    close_after: bool,
    /// The client sent end of stream: answer what is complete, then close.
    peer_closed: bool,
}

/// What one request head asks for.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    status: Status,
    /// `HEAD`: the headers of the answer without its body.
    head_only: bool,
    keep_alive: bool,
    /// HTTP/1.0 asking for keep-alive must be told it is kept.
    say_keep_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    Unavailable,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::Unavailable => "503 Service Unavailable",
        }
    }

    fn body(self) -> &'static [u8] {
        match self {
            Status::Ok => b"",
            Status::BadRequest => b"bad request\n",
            Status::NotFound => b"not found: try /metrics\n",
            Status::MethodNotAllowed => b"method not allowed: use GET\n",
            Status::HeadTooLarge => b"request head too large\n",
            Status::Unavailable => b"too many connections\n",
        }
    }
}

impl HttpServer {
    /// Binds `addr` and registers the listener under `listener_token`; its
    /// connections get tokens `first_token..first_token + MAX_CONNS`.
    pub(super) fn bind(
        addr: SocketAddr,
        registry: &Registry,
        listener_token: Token,
        first_token: usize,
    ) -> io::Result<HttpServer> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, listener_token, Interest::READABLE)?;
        Ok(HttpServer {
            listener,
            first_token,
            conns: (0..MAX_CONNS).map(|_| None).collect(),
            scratch: Vec::new(),
            accept_more: false,
            ready: 0,
        })
    }

    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Descriptors its connections hold.
    pub(super) fn open_conns(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    /// Whether work is left for the next turn at once.
    pub(super) fn wants_turn(&self) -> bool {
        self.accept_more || self.ready != 0
    }

    /// The earliest connection deadline.
    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.conns.iter().flatten().map(|c| c.deadline).min()
    }

    /// Which connection a token names, if it is one of ours.
    pub(super) fn conn_index(&self, token: Token) -> Option<usize> {
        token
            .0
            .checked_sub(self.first_token)
            .filter(|&i| i < MAX_CONNS)
    }

    /// The listener is readable.
    pub(super) fn listener_ready(&mut self) {
        self.accept_more = true;
    }

    /// Connection `index` is readable or writable: it is served at the
    /// next turn, after the core has seen the time of this one.
    pub(super) fn conn_event(&mut self, index: usize) {
        self.ready |= 1 << index;
    }

    /// Accepts, closes connections past their deadline, and serves the
    /// connections that had events or requests left.
    pub(super) fn turn(&mut self, now: u64, registry: &Registry, render: &mut Render<'_>) {
        if self.accept_more {
            self.accept(now, registry);
        }
        for conn in &mut self.conns {
            if conn.as_ref().is_some_and(|c| c.deadline <= now) {
                // Dropping the stream closes it and takes it out of the poll.
                *conn = None;
            }
        }
        let ready = std::mem::take(&mut self.ready);
        for index in 0..MAX_CONNS {
            if ready & (1 << index) != 0 {
                self.conn_ready(now, index, render);
            }
        }
    }

    fn accept(&mut self, now: u64, registry: &Registry) {
        self.accept_more = false;
        for _ in 0..ACCEPT_BATCH {
            let (mut stream, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                // Out of descriptors, or worse: the next turn tries again
                // only on the next connection's edge, never in a spin.
                Err(_) => return,
            };
            let Some(index) = self.conns.iter().position(Option::is_none) else {
                // One small write fits any socket buffer; then it is closed.
                let _ = write_response(
                    &mut self.scratch,
                    Status::Unavailable,
                    false,
                    false,
                    &mut |_| {},
                );
                let _ = stream.write(&self.scratch[..]);
                continue;
            };
            let token = Token(self.first_token + index);
            if registry
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            self.conns[index] = Some(HttpConn {
                stream,
                head: Vec::new(),
                out: Vec::new(),
                written: 0,
                deadline: now.saturating_add(IO_TIMEOUT_MS),
                close_after: false,
                peer_closed: false,
            });
        }
        self.accept_more = true;
    }

    /// Serves connection `index`: writes what is pending, reads, and
    /// answers each complete request.
    fn conn_ready(&mut self, now: u64, index: usize, render: &mut Render<'_>) {
        let Some(conn) = self.conns.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let mut answered = 0;
        let keep = loop {
            if conn.written < conn.out.len() {
                match conn.flush() {
                    Ok(true) => conn.deadline = now.saturating_add(IO_TIMEOUT_MS),
                    Ok(false) => break true,
                    Err(_) => break false,
                }
                if conn.written < conn.out.len() {
                    // Wait for the next writable edge.
                    break true;
                }
                conn.out.clear();
                conn.written = 0;
                conn.deadline = now.saturating_add(IO_TIMEOUT_MS);
            }
            if conn.close_after {
                break false;
            }
            if let Some(end) = head_end(&conn.head) {
                if answered == REQUESTS_PER_TURN {
                    self.ready |= 1 << index;
                    break true;
                }
                answered += 1;
                let request = parse(&conn.head[..end]);
                conn.head.drain(..end);
                conn.close_after = !request.keep_alive;
                let response = write_response(
                    &mut self.scratch,
                    request.status,
                    request.head_only,
                    request.keep_alive && request.say_keep_alive,
                    render,
                );
                let Ok(()) = response else {
                    break false;
                };
                if conn.send(&self.scratch).is_err() {
                    break false;
                }
                conn.deadline = now.saturating_add(IO_TIMEOUT_MS);
                continue;
            }
            if conn.peer_closed {
                break false;
            }
            if conn.head.len() >= HEAD_MAX {
                conn.close_after = true;
                let _ = write_response(
                    &mut self.scratch,
                    Status::HeadTooLarge,
                    false,
                    false,
                    render,
                );
                if conn.send(&self.scratch).is_err() {
                    break false;
                }
                continue;
            }
            match conn.read_head() {
                Ok(true) => {}
                Ok(false) => break true,
                Err(_) => break false,
            }
        };
        if !keep && let Some(conn) = self.conns[index].take() {
            conn.close();
        }
    }
}

impl HttpConn {
    /// Closes the connection, first taking what the client sent unread:
    /// closing with unread bytes would reset it, and the reset could
    /// destroy a response (a 400, say) the client has not read yet.
    fn close(mut self) {
        let mut buf = [0; 2048];
        for _ in 0..8 {
            match self.stream.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Writes what the client takes of `response`, keeping the rest.
    fn send(&mut self, response: &[u8]) -> io::Result<()> {
        let mut sent = 0;
        while sent < response.len() {
            match self.stream.write(&response[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out.extend_from_slice(&response[sent..]);
        self.written = 0;
        Ok(())
    }

    /// Writes pending response bytes; `Ok(true)` if any were taken.
    fn flush(&mut self) -> io::Result<bool> {
        let mut progress = false;
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// Reads more of the head, never past [`HEAD_MAX`]; `Ok(false)` once
    /// the socket has nothing more now.
    fn read_head(&mut self) -> io::Result<bool> {
        let mut buf = [0; 2048];
        let room = (HEAD_MAX - self.head.len()).min(buf.len());
        loop {
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.peer_closed = true;
                    return Ok(true);
                }
                Ok(n) => {
                    self.head.extend_from_slice(&buf[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where the first request head in `buf` ends (after its empty line), if
/// it is complete. Lines end in CRLF or, leniently, LF.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') {
        let next = at + nl + 1;
        match buf.get(next..) {
            Some([b'\n', ..]) => return Some(next + 1),
            Some([b'\r', b'\n', ..]) => return Some(next + 2),
            _ => at = next,
        }
    }
    None
}

/// Reads one complete head.
fn parse(head: &[u8]) -> Request {
    let bad = Request {
        status: Status::BadRequest,
        head_only: false,
        keep_alive: false,
        say_keep_alive: false,
    };
    let Ok(text) = std::str::from_utf8(head) else {
        return bad;
    };
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let Some(request_line) = lines.next() else {
        return bad;
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad;
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return bad,
    };
    if method.is_empty() || !method.bytes().all(is_tchar) || !target.starts_with('/') {
        return bad;
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return bad;
    }
    let (mut close, mut keep_alive, mut body) = (false, false, false);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return bad;
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return bad;
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(str::trim) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive |= option.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<u64>() {
                Ok(len) => body |= len > 0,
                Err(_) => return bad,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            body = true;
        }
    }
    let keep = !close && !body && (http11 || keep_alive);
    let path = target.split('?').next().unwrap_or(target);
    let status = if path != "/metrics" {
        Status::NotFound
    } else if method == "GET" || method == "HEAD" {
        Status::Ok
    } else {
        Status::MethodNotAllowed
    };
    Request {
        status,
        head_only: method == "HEAD",
        keep_alive: keep,
        say_keep_alive: !http11,
    }
}

/// RFC 9110's token characters, for methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Builds a whole response in `buf` (cleared first): the status line and
/// headers, then the body (rendered for 200, fixed otherwise). The headers
/// go into the room left before the body, which is then moved up, so the
/// body is written once.
fn write_response(
    buf: &mut Vec<u8>,
    status: Status,
    head_only: bool,
    say_keep_alive: bool,
    render: &mut Render<'_>,
) -> io::Result<()> {
    buf.clear();
    buf.resize(HEAD_ROOM, 0);
    match status {
        Status::Ok => render(buf),
        other => buf.extend_from_slice(other.body()),
    }
    let body_len = buf.len() - HEAD_ROOM;
    let mut head = [0u8; HEAD_ROOM];
    let head_len = {
        let mut w = &mut head[..];
        let content_type = match status {
            Status::Ok => "text/plain; version=0.0.4; charset=utf-8",
            _ => "text/plain; charset=utf-8",
        };
        write!(
            w,
            "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {body_len}\r\n",
            status.line()
        )?;
        if status == Status::MethodNotAllowed {
            w.write_all(b"Allow: GET, HEAD\r\n")?;
        }
        let keeps = matches!(
            status,
            Status::Ok | Status::NotFound | Status::MethodNotAllowed
        );
        if !keeps {
            w.write_all(b"Connection: close\r\n")?;
        } else if say_keep_alive {
            w.write_all(b"Connection: keep-alive\r\n")?;
        }
        w.write_all(b"\r\n")?;
        HEAD_ROOM - w.len()
    };
    buf[HEAD_ROOM - head_len..HEAD_ROOM].copy_from_slice(&head[..head_len]);
    let end = if head_only { HEAD_ROOM } else { buf.len() };
    buf.copy_within(HEAD_ROOM - head_len..end, 0);
    buf.truncate(end - (HEAD_ROOM - head_len));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Request {
        let end = head_end(text.as_bytes()).expect("a complete head");
        parse(&text.as_bytes()[..end])
    }

    #[test]
    fn heads_end_at_an_empty_line_with_crlf_or_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(req("GET /metrics HTTP/1.1\r\n\r\n").status, Status::Ok);
        assert_eq!(req("GET /metrics?x=1 HTTP/1.1\r\n\r\n").status, Status::Ok);
        let head = req("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.head_only && head.status == Status::Ok);
        assert_eq!(req("GET / HTTP/1.1\r\n\r\n").status, Status::NotFound);
        assert_eq!(
            req("POST /metrics HTTP/1.1\r\n\r\n").status,
            Status::MethodNotAllowed
        );
        for bad in [
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(req(bad).status, Status::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        assert!(req("GET /metrics HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!req("GET /metrics HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(!req("GET /metrics HTTP/1.0\r\n\r\n").keep_alive);
        let kept = req("GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(kept.keep_alive && kept.say_keep_alive);
        assert!(!req("POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n").keep_alive);
    }

    #[test]
    fn responses_carry_their_length_and_head_omits_the_body() {
        let mut buf = Vec::new();
        write_response(&mut buf, Status::Ok, false, false, &mut |out| {
            out.extend_from_slice(b"a 1\n")
        })
        .unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(text.ends_with("Content-Length: 4\r\n\r\na 1\n"), "{text}");
        write_response(&mut buf, Status::Ok, true, true, &mut |out| {
            out.extend_from_slice(b"a 1\n")
        })
        .unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(
            text.ends_with("Content-Length: 4\r\nConnection: keep-alive\r\n\r\n"),
            "{text}"
        );
        write_response(&mut buf, Status::BadRequest, false, false, &mut |_| {}).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("Connection: close\r\n"), "{text}");
    }
}
