//! Sockets: resolving, accepting, watching waiting clients, connecting to the
//! upstream, relaying and closing.

use super::*;
use crate::config::SendProxy;
use crate::config::settings::{not_on_this_host, upstream_is_local};
use crate::config::units::HostPort;
use crate::proxy_protocol::{self, Addresses, Header, ParseError, Version};
use std::io::Read;

/// Accept at most this many connections per loop turn, so a flood cannot starve
/// the connections already in flight.
pub(super) const ACCEPT_BATCH: usize = 256;

/// Resolves each instance, in the order of [`Config::upstreams`] (never on
/// the loop: at start, on a reload's helper thread, or on the thread of a
/// `Handle::reload`); never empty (an empty list is refused as an invalid
/// config).
pub(crate) fn resolve_upstreams(config: &Config) -> Result<Vec<Vec<SocketAddr>>, Error> {
    if config.upstreams.is_empty() {
        return Err(Error::Invalid(
            "upstream: no upstream instance given".into(),
        ));
    }
    config
        .upstreams
        .iter()
        .map(|upstream| resolve_one(config, upstream))
        .collect()
}

fn resolve_one(config: &Config, upstream: &HostPort) -> Result<Vec<SocketAddr>, Error> {
    let addrs = resolve(
        "upstream",
        &upstream.to_string(),
        (upstream.host.as_str(), upstream.port).to_socket_addrs(),
    )?;
    // A service tcplock runs listens here: a name is judged by what it
    // resolves to (the config check judged literal addresses).
    if config.spawn.is_some()
        && let Some(remote) = addrs.iter().find(|a| !upstream_is_local(a.ip()))
    {
        return Err(Error::Invalid(format!(
            "spawn: {} (it resolves to {})",
            not_on_this_host(&upstream.to_string()),
            remote.ip()
        )));
    }
    Ok(addrs)
}

/// Every address a lookup gave, or an error naming `what` and `name`; an empty
/// answer is an error too.
pub(crate) fn resolve(
    what: &'static str,
    name: &str,
    lookup: io::Result<std::vec::IntoIter<SocketAddr>>,
) -> Result<Vec<SocketAddr>, Error> {
    let resolve_error = |source| Error::Resolve {
        what,
        name: name.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = lookup.map_err(resolve_error)?.collect();
    if addrs.is_empty() {
        return Err(resolve_error(io::Error::new(
            io::ErrorKind::NotFound,
            "no addresses",
        )));
    }
    Ok(addrs)
}

impl Shell {
    pub(super) fn accept(&mut self, now: u64) {
        self.accept_more = false;
        // Out of descriptors (or at the reserve): the core says when to
        // try again (`ResumeAccepting`, after a close or a retry backoff).
        if self.core.accept_paused() {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            if self.listener.is_none() {
                return;
            }
            if self.at_fd_reserve() {
                if self.pool.drop_idle_pipes() {
                    continue;
                }
                self.pause_accepting(now, "fd_reserve", None);
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            let (client, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.reserve_pause_logged = false;
                    return;
                }
                Err(e) if sys::is_fd_exhaustion(&e) => {
                    if self.pool.drop_idle_pipes() {
                        continue;
                    }
                    self.pause_accepting(now, "fd_exhausted", Some(e));
                    return;
                }
                // These concern one client, not the listener.
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
                // Anything else would only repeat at once: say so and wait for
                // the next connection's readiness edge instead of spinning.
                Err(e) => {
                    if let Some(line) = self.logger.line(LogLevel::Error, "accept_failed") {
                        line.field("error", e);
                    }
                    return;
                }
            };
            let conn = self.core.handle_accepted(now, addr);
            self.add_conn(now, conn, client);
            self.drain(now);
        }
        self.accept_more = true;
    }

    /// Whether one more client would eat into the descriptors activation needs.
    pub(super) fn at_fd_reserve(&self) -> bool {
        // Control and metrics connections live in their own part of the
        // reserve: counting them here too would count them twice.
        let open = self.core.conn_count() + self.pool.idle_pipe_fds();
        self.fds.at_reserve(open, &self.config)
    }

    pub(super) fn pause_accepting(&mut self, now: u64, reason: &str, error: Option<io::Error>) {
        let level = if error.is_none() && self.reserve_pause_logged {
            LogLevel::Debug
        } else {
            LogLevel::Warn
        };
        self.reserve_pause_logged |= error.is_none();
        if let Some(line) = self.logger.line(level, "accept_paused") {
            line.field("reason", reason)
                .field_opt("error", error)
                .field("open_connections", self.core.conn_count());
        }
        self.core.handle_accept_paused(now);
        self.drain(now);
    }

    pub(super) fn add_conn(&mut self, now: u64, conn: ConnRef, mut client: TcpStream) {
        let token = client_token(conn);
        // Both interests from the start, so relaying needs no re-registration:
        // one epoll_ctl per socket for its whole life.
        if let Err(e) = self.poll.registry().register(
            &mut client,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            if let Some(line) = self.logger.line(LogLevel::Error, "register_failed") {
                line.field("conn", conn.id()).field("error", e);
            }
            self.core.handle_client_left(now, conn);
            return;
        }
        if self.io.len() <= conn.slot() {
            self.io.resize_with(conn.slot() + 1, || None);
        }
        self.io[conn.slot()] = Some(ConnIo {
            conn,
            client,
            client_ready: Readiness::default(),
            proxied_client: None,
            stage: if self.config.accept_proxy {
                Stage::Header
            } else {
                Stage::Waiting
            },
        });
    }

    pub(super) fn conn_ready(
        &mut self,
        now: u64,
        slot: usize,
        upstream_side: bool,
        ready: SocketEvent,
    ) {
        let Some(io) = self.io.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let conn = io.conn;
        if !upstream_side {
            io.client_ready.note(ready);
        }
        match &mut io.stage {
            Stage::Header => {
                if !upstream_side {
                    self.read_proxy_header(now, conn);
                }
            }
            Stage::Relaying(relay) => {
                if upstream_side {
                    relay.note_upstream_ready(ready);
                }
                self.pump(now, conn);
            }
            Stage::Connecting(connecting)
                if upstream_side && connecting.since_turn == self.turn =>
            {
                // The event was for the socket this token named before (an
                // attempt given up on this turn, or a connection that ended):
                // the new one's own state comes with the next poll.
            }
            Stage::Connecting(connecting) if upstream_side => {
                connecting.upstream_ready.note(ready);
                match connect_result(&connecting.upstream, ready) {
                    ConnectResult::Pending => {}
                    ConnectResult::Connected => {
                        self.core.handle_upstream_connected(now, conn);
                        self.drain(now);
                    }
                    ConnectResult::Failed(e) => {
                        self.connect_next(now, conn, e);
                        self.drain(now);
                    }
                }
            }
            Stage::Waiting | Stage::Connecting(_) => {
                // Plain bytes from a waiting client only wait for activation;
                // only a close or a failure needs a look at whether it left.
                if !upstream_side && ready.closing {
                    let seen = waiting_client(&io.client);
                    self.waiting_client_seen(now, conn, seen);
                    self.drain(now);
                }
            }
        }
    }

    pub(super) fn pump(&mut self, now: u64, conn: ConnRef) {
        let Some(io) = self
            .io
            .get_mut(conn.slot())
            .and_then(Option::as_mut)
            .filter(|io| io.conn == conn)
        else {
            return;
        };
        let Stage::Relaying(relay) = &mut io.stage else {
            return;
        };
        let before = relay.bytes();
        let pumped = relay.pump(&io.client, &mut io.client_ready, &mut self.pool);
        // For the stalled-queue check: the counters are in the cache already,
        // and a holder that moves nothing never gets here.
        if relay.bytes() != before {
            relay.last_active = now;
        }
        if let Some(error) = self.pool.take_splice_refusal()
            && let Some(line) = self.logger.line(LogLevel::Warn, "splice_refused")
        {
            line.field("error", error).field("relay", "copying");
        }
        match pumped {
            Pumped::Idle => {}
            Pumped::Busy => {
                if !relay.scheduled {
                    relay.scheduled = true;
                    debug_assert!(
                        !self.busy_relays.contains(&conn),
                        "conn {} is on the busy list twice",
                        conn.id()
                    );
                    self.busy_relays.push_back(conn);
                }
            }
            Pumped::Ended(end) => {
                self.core.handle_relay_ended(now, conn, end);
                self.drain(now);
            }
        }
    }

    /// `Action::Connect`: starts connecting `conn` to `instance`'s
    /// addresses, the first one first.
    pub(super) fn connect(&mut self, now: u64, conn: ConnRef, instance: InstanceId) {
        if !matches!(self.io_of(conn).map(|io| &io.stage), Some(Stage::Waiting)) {
            return;
        }
        match self.upstreams.addrs(instance) {
            Some(addrs) => self.connect_from(now, conn, addrs, 0, None),
            // The table follows every change of the core's list, so this
            // cannot happen; should it, the client goes on to the next
            // instance as after any failed connect.
            None => self.core.handle_upstream_failed(
                now,
                conn,
                &format!("no address known for instance {instance}"),
            ),
        }
    }

    /// `Action::AbandonConnect`: the connect under way is given up (the
    /// core sends the client to another instance); dropping its socket
    /// closes it, so none of its events can arrive for the next one.
    pub(super) fn abandon_connect(&mut self, conn: ConnRef) {
        if let Some(io) = self.io_of(conn)
            && matches!(io.stage, Stage::Connecting(_))
        {
            io.stage = Stage::Waiting;
        }
    }

    /// Tries the next of the addresses the connection is walking, after the
    /// one that just failed (or timed out).
    pub(super) fn connect_next(&mut self, now: u64, conn: ConnRef, failed: Option<io::Error>) {
        let (addrs, start) = match self.io_of(conn).map(|io| &io.stage) {
            Some(Stage::Connecting(connecting)) => {
                (Arc::clone(&connecting.addrs), connecting.next_addr)
            }
            _ => return,
        };
        self.connect_from(now, conn, addrs, start, failed);
    }

    /// Tries `addrs` from `start` on in turn (one instance's list); tells
    /// the core how many are left with each attempt, and reports failure
    /// when none is left.
    fn connect_from(
        &mut self,
        now: u64,
        conn: ConnRef,
        addrs: Arc<[SocketAddr]>,
        start: usize,
        failed: Option<io::Error>,
    ) {
        let turn = self.turn;
        let mut last_error = failed;
        for (index, &addr) in addrs.iter().enumerate().skip(start) {
            let mut attempt = self.connect_upstream(addr, conn);
            if matches!(&attempt, Err(e) if sys::is_fd_exhaustion(e)) && self.pool.drop_idle_pipes()
            {
                attempt = self.connect_upstream(addr, conn);
            }
            match attempt {
                Ok(upstream) => {
                    if let Some(io) = self.io_of(conn) {
                        // Replacing the stage closes the socket of an
                        // attempt given up on.
                        io.stage = Stage::Connecting(Box::new(Connecting {
                            upstream,
                            upstream_ready: Readiness::default(),
                            addrs: Arc::clone(&addrs),
                            next_addr: index + 1,
                            since_turn: turn,
                        }));
                    }
                    let addresses_left = addrs.len() - index;
                    self.core.handle_connect_attempt(now, conn, addresses_left);
                    return;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(io) = self.io_of(conn) {
            io.stage = Stage::Waiting;
        }
        let error = last_error.map_or_else(|| "no address".to_string(), |e| e.to_string());
        self.core.handle_upstream_failed(now, conn, &error);
    }

    pub(super) fn connect_upstream(
        &self,
        addr: SocketAddr,
        conn: ConnRef,
    ) -> io::Result<TcpStream> {
        let mut upstream = TcpStream::connect(addr)?;
        self.poll.registry().register(
            &mut upstream,
            upstream_token(conn),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(upstream)
    }

    pub(super) fn start_relay(&mut self, now: u64, conn: ConnRef) {
        let Some(io) = self.io_of(conn) else {
            return;
        };
        let Stage::Connecting(connecting) = std::mem::replace(&mut io.stage, Stage::Waiting) else {
            return;
        };
        let Connecting {
            upstream,
            upstream_ready,
            ..
        } = *connecting;
        // Best effort: small request/response traffic should not wait for
        // Nagle. (Clients inherit the option from the listener.)
        let _ = upstream.set_nodelay(true);
        let send = self.config.send_proxy;
        let header = self
            .io_of(conn)
            .and_then(|io| proxy_header(send, &io.client, io.proxied_client.as_deref().copied()));
        let relay = Relay::new(
            upstream,
            upstream_ready,
            header.as_ref().map(Header::as_bytes),
            &mut self.pool,
            now,
        );
        if let Some(io) = self.io_of(conn) {
            io.stage = Stage::Relaying(Box::new(relay));
        }
        // Each relay is on the busy list at most once: room for every
        // connection holding a permit, made now, means relaying never grows it.
        let relays = self.core.active();
        self.busy_relays
            .reserve(relays.saturating_sub(self.busy_relays.len()));
        // Bytes the client sent while queued wait in the kernel, announced by
        // an edge already spent; its readiness remembers them, so pump now.
        self.pump(now, conn);
    }

    /// For the stalled-queue check: how long since the most recently active
    /// relay moved a byte (0 with none relaying). Runs once per check, not
    /// per byte: it walks the connection table, which is bounded.
    pub(super) fn holders_idle_ms(&self, now: u64) -> u64 {
        self.io
            .iter()
            .flatten()
            .filter_map(|io| match &io.stage {
                Stage::Relaying(relay) => Some(now.saturating_sub(relay.last_active)),
                _ => None,
            })
            .min()
            .unwrap_or(0)
    }

    pub(super) fn close(
        &mut self,
        now: u64,
        conn: ConnRef,
        outcome: Outcome,
        ended_by: EndedBy,
        age_ms: u64,
    ) {
        let Some(io) = self
            .io
            .get_mut(conn.slot())
            .and_then(|slot| slot.take_if(|io| io.conn == conn))
        else {
            return;
        };
        let (up, down) = match io.stage {
            Stage::Relaying(relay) => {
                if relay.scheduled {
                    // Only live relays stay listed, so the room reserved for
                    // the permit holders always suffices.
                    self.busy_relays.retain(|listed| *listed != conn);
                }
                let bytes = relay.bytes();
                if let Some(metrics) = &mut self.metrics {
                    let duration = now.saturating_sub(relay.started);
                    metrics.recorder.relay_closed(bytes.0, bytes.1, duration);
                }
                relay.release(&mut self.pool);
                bytes
            }
            Stage::Header | Stage::Waiting | Stage::Connecting(_) => (0, 0),
        };
        if let Some(line) = self.logger.line(LogLevel::Info, "closed") {
            line.field("conn", conn.id())
                .field("outcome", outcome)
                .field("ended_by", ended_by)
                .field("bytes_up", up)
                .field("bytes_down", down)
                .field("duration_ms", age_ms);
        }
        // Dropping the streams closes them, which also removes them from epoll.
    }

    /// `--accept-proxy`: peeks at what the client sent; once it holds a
    /// whole PROXY header, consumes exactly that (what follows stays in the
    /// kernel for the upstream) and tells the core. An incomplete header
    /// waits for more bytes (the core's timer bounds the wait); a bad one,
    /// or an end of stream or error before it is complete, is reported as
    /// bad. Never blocks: the socket is non-blocking and only bytes already
    /// peeked are read.
    fn read_proxy_header(&mut self, now: u64, conn: ConnRef) {
        let Some(io) = self.io_of(conn) else {
            return;
        };
        let mut buf = [0u8; proxy_protocol::MAX_HEADER_LEN];
        let peeked = loop {
            match io.client.peek(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let header = match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) | Ok(0) => ProxyHeader::Bad,
            Ok(n) => match proxy_protocol::parse(&buf[..n]) {
                Err(ParseError::Incomplete) if !io.client_ready.closing() => return,
                Err(_) => ProxyHeader::Bad,
                Ok(parsed) => match consume(&io.client, &mut buf[..parsed.len]) {
                    Ok(()) => {
                        io.stage = Stage::Waiting;
                        match parsed.addresses {
                            Some(addresses) => {
                                io.proxied_client = Some(Box::new(addresses.source));
                                ProxyHeader::Client(addresses.source)
                            }
                            None => ProxyHeader::Local,
                        }
                    }
                    Err(_) => ProxyHeader::Bad,
                },
            },
        };
        let closing = io.client_ready.closing();
        self.core.handle_proxy_header(now, conn, header);
        // The event that brought the header may also have brought the
        // client's end: look at it as a waiting client's would be.
        if header != ProxyHeader::Bad
            && closing
            && let Some(io) = self.io_of(conn)
        {
            let seen = waiting_client(&io.client);
            self.waiting_client_seen(now, conn, seen);
        }
        self.drain(now);
    }

    /// Tells the core what a look at a waiting client's socket found.
    fn waiting_client_seen(&mut self, now: u64, conn: ConnRef, seen: WaitingClient) {
        match seen {
            WaitingClient::Present => {}
            WaitingClient::Gone => self.core.handle_client_left(now, conn),
            WaitingClient::EndOfStream => self.core.handle_client_eof(now, conn),
        }
    }

    pub(super) fn stop_accepting(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.accept_more = false;
    }
}

/// The `--send-proxy` header for a client's connection: its address and the
/// local address it reached. A client whose addresses cannot be read (it
/// has just gone) gets the "unknown origin" header: the upstream still sees
/// a valid header before the end of stream that follows.
/// With `--accept-proxy`, the client is the one the balancer's header named.
fn proxy_header(
    send: SendProxy,
    client: &TcpStream,
    proxied: Option<SocketAddr>,
) -> Option<Header> {
    let version = match send {
        SendProxy::Off => return None,
        SendProxy::V1 => Version::V1,
        SendProxy::V2 => Version::V2,
    };
    let peer = proxied.map_or_else(|| client.peer_addr(), Ok);
    let addresses = match (peer, client.local_addr()) {
        (Ok(source), Ok(destination)) => Some(Addresses {
            source,
            destination,
        }),
        _ => None,
    };
    Some(proxy_protocol::encode(version, addresses))
}

/// Reads exactly `buf.len()` bytes that a peek has shown are there.
fn consume(mut client: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    // Bounded: each read takes at least one of the peeked bytes.
    for _ in 0..=buf.len() {
        if done == buf.len() {
            return Ok(());
        }
        match client.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the peeked PROXY header could not be read",
    ))
}

pub(super) fn client_token(conn: ConnRef) -> Token {
    Token(FIRST_CONN_TOKEN + conn.slot() * 2)
}

pub(super) fn upstream_token(conn: ConnRef) -> Token {
    Token(FIRST_CONN_TOKEN + conn.slot() * 2 + 1)
}

pub(super) enum ConnectResult {
    Pending,
    Connected,
    Failed(Option<io::Error>),
}

/// Whether a non-blocking connect finished (mio's documented recipe: a pending
/// error means failure; a peer address means connected; `NotConnected` means
/// not yet). On Linux a connecting socket turns writable only once the
/// handshake is over, and a failed connect reports an error or hang-up, so
/// plain writability already says "connected" and saves both calls.
pub(super) fn connect_result(upstream: &TcpStream, ready: SocketEvent) -> ConnectResult {
    if ready.writable && !ready.closing {
        return ConnectResult::Connected;
    }
    match upstream.take_error() {
        Ok(Some(e)) | Err(e) => return ConnectResult::Failed(Some(e)),
        Ok(None) if ready.writable => return ConnectResult::Connected,
        Ok(None) => {}
    }
    match upstream.peer_addr() {
        Ok(_) => ConnectResult::Connected,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectResult::Pending,
        Err(e) => ConnectResult::Failed(Some(e)),
    }
}

/// What a close or error event on a waiting client's socket means.
pub(super) enum WaitingClient {
    /// Nothing ended after all.
    Present,
    /// Reset or failed, or closed with nothing pending.
    Gone,
    /// Its end of stream arrived after bytes that wait in the kernel: whether
    /// it keeps its place is the core's call (`--queued-eof`).
    EndOfStream,
}

pub(super) fn waiting_client(client: &TcpStream) -> WaitingClient {
    // The kernel keeps bytes that arrived before a reset, so a peek alone
    // would find them and keep a dead client queued; a reset or error leaves
    // its mark in SO_ERROR, which a half-close does not.
    if !matches!(client.take_error(), Ok(None)) {
        return WaitingClient::Gone;
    }
    let mut byte = [0u8; 1];
    loop {
        match client.peek(&mut byte) {
            Ok(0) => return WaitingClient::Gone,
            // Called on a close event with no error pending: the peer's FIN
            // arrived behind these bytes.
            Ok(_) => return WaitingClient::EndOfStream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WaitingClient::Present,
            Err(_) => return WaitingClient::Gone,
        }
    }
}
