//! Talking to a service manager (systemd) as the `tcplock` binary does:
//! `sd_notify` datagrams (`READY=1`, `STATUS=`, `RELOADING=1`, `STOPPING=1`,
//! `WATCHDOG=1`) and socket activation (descriptor 3 as the listener).
//!
//! No libsystemd: a notification is one datagram sent to the Unix socket
//! `NOTIFY_SOCKET` names, a path or an abstract `@name`, without blocking. A
//! datagram the socket has no room for is dropped: the loop never waits on
//! the service manager. The watchdog is fed from the loop itself, so a loop
//! that is wedged stops feeding it and systemd restarts tcplock.

use std::io;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

use mio::net::TcpListener;

use super::log::Logger;
use super::{Duration, Shell};
use crate::api::error::Error;
use crate::config::LogLevel;
use crate::sys;

/// The variables a service manager sets for tcplock alone. They are removed
/// from the environment of every process tcplock starts (hooks, and a
/// supervised upstream), which is not the service they describe: a child
/// that saw them could claim the listening socket or talk to systemd in
/// tcplock's name.
pub(crate) const SERVICE_MANAGER_ENV: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The shortest time between two `STATUS=` updates.
const STATUS_INTERVAL_MS: u64 = 1_000;

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// Whether a service manager passed this process its listening sockets:
/// `LISTEN_PID` is our pid and `LISTEN_FDS` is set. Then `-l` may be left out.
pub fn socket_activated() -> bool {
    env_var("LISTEN_PID").and_then(|pid| pid.parse::<u32>().ok()) == Some(std::process::id())
        && env_var("LISTEN_FDS").is_some()
}

/// The listener socket activation passed, made non-blocking; `None` when
/// there is none for this process. Anything but exactly one listening TCP
/// socket on descriptor 3 is an error naming what is wrong.
pub(crate) fn activated_listener() -> Result<Option<TcpListener>, Error> {
    if !socket_activated() {
        return Ok(None);
    }
    let invalid = |reason: String| Error::Invalid(format!("socket activation: {reason}"));
    let count = env_var("LISTEN_FDS").unwrap_or_default();
    if count != "1" {
        return Err(invalid(format!(
            "LISTEN_FDS={count}, but tcplock takes exactly one listening socket"
        )));
    }
    let fd = sys::take_listen_fd().map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => invalid("fd 3 is not open".into()),
        _ => invalid(format!("fd 3 cannot be taken: {e}")),
    })?;
    let kind = sys::socket_kind(fd.as_fd()).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTSOCK) => invalid("fd 3 is not a socket".into()),
        _ => invalid(format!("fd 3 cannot be inspected: {e}")),
    })?;
    if !kind.inet || !kind.stream {
        return Err(invalid(
            "fd 3 is not a TCP socket (use ListenStream= with an address and port)".into(),
        ));
    }
    if !kind.listening {
        return Err(invalid("fd 3 is a TCP socket that is not listening".into()));
    }
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true).map_err(|source| Error::Io {
        context: "socket activation: cannot make fd 3 non-blocking",
        source,
    })?;
    Ok(Some(TcpListener::from_std(listener)))
}

/// The service manager's notification socket, when there is one; every
/// method does nothing without it.
pub(super) struct Notifier {
    target: Option<Box<Target>>,
}

struct Target {
    socket: UnixDatagram,
    addr: UnixAddr,
    /// Half the watchdog interval, in ms, and when the next ping is due.
    watchdog: Option<(u64, u64)>,
    /// The `(queued, active)` the service manager last saw.
    shown: (usize, usize),
    /// When a new `STATUS=` may go out.
    status_at: u64,
    /// The counts differ from those shown, held back until `status_at`.
    status_pending: bool,
    /// `RELOADING=1` went out; `READY=1` is owed.
    reloading: bool,
    stopping: bool,
    /// A failed send was logged; the next is logged only after a success.
    failing: bool,
    /// `READY=1`, `RELOADING=1` and `STOPPING=1` that found the socket full, in order: they
    /// are retried each turn (see [`OWED_RETRY_MS`]), never dropped.
    owed: Vec<String>,
    /// When the owed messages are tried again.
    retry_at: u64,
}

/// How soon a message that found the notification socket full is retried.
const OWED_RETRY_MS: u64 = 50;

impl Notifier {
    pub(super) fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. A value
    /// tcplock cannot use is logged and ignored: tcplock still serves.
    pub(super) fn from_env(logger: &mut Logger) -> Result<Notifier, Error> {
        let Some(name) = env_var("NOTIFY_SOCKET") else {
            return Ok(Notifier::disabled());
        };
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => UnixAddr::from_abstract_name(abstract_name.as_bytes()),
            None if name.starts_with('/') => UnixAddr::from_pathname(&name),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "neither a path nor an @abstract name",
            )),
        };
        let addr = match addr {
            Ok(addr) => addr,
            Err(e) => {
                if let Some(line) = logger.line(LogLevel::Warn, "notify_unusable") {
                    line.field("notify_socket", &name).field("error", e);
                }
                return Ok(Notifier::disabled());
            }
        };
        let io_error = |context| move |source| Error::Io { context, source };
        let socket =
            UnixDatagram::unbound().map_err(io_error("cannot create the notification socket"))?;
        socket
            .set_nonblocking(true)
            .map_err(io_error("cannot create the notification socket"))?;
        Ok(Notifier {
            target: Some(Box::new(Target {
                socket,
                addr,
                watchdog: watchdog_from_env(logger).map(|half| (half, 0)),
                shown: (0, 0),
                status_at: 0,
                status_pending: false,
                reloading: false,
                stopping: false,
                failing: false,
                owed: Vec::new(),
                retry_at: 0,
            })),
        })
    }

    /// `READY=1` with the first status, and the first watchdog ping.
    pub(super) fn ready(&mut self, now: u64, counts: (usize, usize), logger: &mut Logger) {
        let Some(target) = &mut self.target else {
            return;
        };
        let mut message = format!("READY=1\n{}", status(counts));
        if let Some((half, next)) = &mut target.watchdog {
            message.push_str("\nWATCHDOG=1");
            *next = now.saturating_add(*half);
        }
        target.shown = counts;
        target.status_at = now.saturating_add(STATUS_INTERVAL_MS);
        target.send_owed(message, logger);
    }

    /// `RELOADING=1` with the time it started on systemd's clock, once per
    /// reload however many signals asked for it.
    pub(super) fn reloading(&mut self, logger: &mut Logger) {
        let Some(target) = &mut self.target else {
            return;
        };
        // Nothing but STOPPING=1's followers once stopping.
        if target.stopping || std::mem::replace(&mut target.reloading, true) {
            return;
        }
        let message = format!("RELOADING=1\nMONOTONIC_USEC={}", sys::monotonic_usec());
        target.send_owed(message, logger);
    }

    /// `READY=1` once the reload asked for is done, applied or not.
    pub(super) fn reloaded(&mut self, logger: &mut Logger) {
        let Some(target) = &mut self.target else {
            return;
        };
        if std::mem::take(&mut target.reloading) && !target.stopping {
            target.send_owed("READY=1".to_string(), logger);
        }
    }

    /// `STOPPING=1`, once.
    pub(super) fn stopping(&mut self, logger: &mut Logger) {
        let Some(target) = &mut self.target else {
            return;
        };
        if !std::mem::replace(&mut target.stopping, true) {
            // A reload under way owes READY=1 no more.
            target.reloading = false;
            target.send_owed("STOPPING=1".to_string(), logger);
        }
    }

    /// At the end of a loop turn: feeds the watchdog when due, and sends
    /// the counts when they changed, at most once per [`STATUS_INTERVAL_MS`].
    pub(super) fn turn_end(&mut self, now: u64, counts: (usize, usize), logger: &mut Logger) {
        let Some(target) = &mut self.target else {
            return;
        };
        if !target.owed.is_empty() && now >= target.retry_at {
            let owed = std::mem::take(&mut target.owed);
            for message in owed {
                target.send_owed(message, logger);
            }
        }
        if !target.owed.is_empty() && now >= target.retry_at {
            target.retry_at = now.saturating_add(OWED_RETRY_MS);
        }
        if let Some((half, next)) = &mut target.watchdog
            && now >= *next
        {
            *next = now.saturating_add(*half);
            target.send("WATCHDOG=1", logger);
        }
        target.status_pending = counts != target.shown;
        if target.status_pending && now >= target.status_at {
            target.status_pending = false;
            target.shown = counts;
            target.status_at = now.saturating_add(STATUS_INTERVAL_MS);
            target.send(&status(counts), logger);
        }
    }

    /// The next time [`Notifier::turn_end`] has something to send: a watchdog
    /// ping, or counts held back. `None` when idle: unchanged counts never
    /// wake the loop.
    pub(super) fn deadline(&self) -> Option<u64> {
        let target = self.target.as_ref()?;
        let ping = target.watchdog.map(|(_, next)| next);
        let status = target.status_pending.then_some(target.status_at);
        let owed = (!target.owed.is_empty()).then_some(target.retry_at);
        [ping, status, owed].into_iter().flatten().min()
    }
}

impl Target {
    /// A message that must arrive (`READY=1`, `RELOADING=1`, `STOPPING=1`): sent after
    /// those owed before it, or owed itself if the socket is full.
    fn send_owed(&mut self, message: String, logger: &mut Logger) {
        if !self.owed.is_empty() || !self.try_send(&message, logger) {
            self.owed.push(message);
        }
    }

    /// One datagram, never waited for: one the socket has no room for is
    /// dropped (`STATUS=`, `WATCHDOG=1`).
    fn send(&mut self, message: &str, logger: &mut Logger) {
        if !self.try_send(message, logger)
            && let Some(line) = logger.line(LogLevel::Debug, "notify_dropped")
        {
            line.field("message", message.lines().next().unwrap_or(""));
        }
    }

    /// Sends one datagram; `false` if the socket had no room for it (an
    /// error is logged and counts as sent: it would only repeat).
    fn try_send(&mut self, message: &str, logger: &mut Logger) -> bool {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => {
                self.failing = false;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true)
                    && let Some(line) = logger.line(LogLevel::Warn, "notify_failed")
                {
                    line.field("error", e);
                }
                true
            }
        }
    }
}

fn status((queued, active): (usize, usize)) -> String {
    format!("STATUS=queued={queued} active={active}")
}

/// Half the interval `WATCHDOG_USEC` asks for, in ms (at least 1), when the
/// watchdog is meant for this process (`WATCHDOG_PID` unset or ours).
fn watchdog_from_env(logger: &mut Logger) -> Option<u64> {
    let usec = env_var("WATCHDOG_USEC")?;
    if let Some(pid) = env_var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    match usec.parse::<u64>() {
        Ok(usec) if usec > 0 => Some((usec / 2_000).max(1)),
        _ => {
            if let Some(line) = logger.line(LogLevel::Warn, "watchdog_unusable") {
                line.field("watchdog_usec", &usec);
            }
            None
        }
    }
}

impl Shell {
    /// `timeout` shortened to the notifier's next deadline, if it has one.
    pub(super) fn notify_timeout(&self, timeout: Option<Duration>) -> Option<Duration> {
        let Some(deadline) = self.notify.deadline() else {
            return timeout;
        };
        super::sooner(timeout, super::until(self.now(), deadline))
    }

    pub(super) fn notify_counts(&self) -> (usize, usize) {
        (self.core.queue_len(), self.core.active())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier(watchdog: Option<u64>) -> (Notifier, UnixDatagram) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("tcplock-notify-unit-{}-{n}", std::process::id());
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
        let theirs = UnixDatagram::bind_addr(&addr).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let ours = UnixDatagram::unbound().unwrap();
        ours.set_nonblocking(true).unwrap();
        let target = Target {
            socket: ours,
            addr,
            watchdog: watchdog.map(|half| (half, 0)),
            shown: (0, 0),
            status_at: 0,
            status_pending: false,
            reloading: false,
            stopping: false,
            failing: false,
            owed: Vec::new(),
            retry_at: 0,
        };
        (
            Notifier {
                target: Some(Box::new(target)),
            },
            theirs,
        )
    }

    fn received(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn status_is_sent_on_change_at_most_once_a_second_and_idle_sets_no_deadline() {
        let (mut n, peer) = notifier(None);
        let mut log = Logger::new(LogLevel::Error);
        n.ready(0, (0, 0), &mut log);
        assert_eq!(received(&peer), ["READY=1\nSTATUS=queued=0 active=0"]);
        n.turn_end(10, (0, 0), &mut log);
        assert_eq!(n.deadline(), None, "nothing changed: no wake-up");
        n.turn_end(20, (2, 1), &mut log);
        assert!(received(&peer).is_empty(), "within a second of the last");
        assert_eq!(n.deadline(), Some(1_000));
        n.turn_end(1_000, (3, 1), &mut log);
        assert_eq!(received(&peer), ["STATUS=queued=3 active=1"]);
        assert_eq!(n.deadline(), None);
        // Changed and changed back before it could be sent: nothing to say.
        n.turn_end(1_200, (1, 1), &mut log);
        assert_eq!(n.deadline(), Some(2_000));
        n.turn_end(1_500, (3, 1), &mut log);
        assert_eq!(n.deadline(), None);
        n.turn_end(2_500, (3, 1), &mut log);
        assert!(received(&peer).is_empty());
    }

    #[test]
    fn watchdog_pings_every_half_interval() {
        let (mut n, peer) = notifier(Some(100));
        let mut log = Logger::new(LogLevel::Error);
        n.ready(0, (0, 0), &mut log);
        assert_eq!(
            received(&peer),
            ["READY=1\nSTATUS=queued=0 active=0\nWATCHDOG=1"]
        );
        assert_eq!(n.deadline(), Some(100));
        n.turn_end(50, (0, 0), &mut log);
        assert!(received(&peer).is_empty());
        n.turn_end(100, (0, 0), &mut log);
        assert_eq!(received(&peer), ["WATCHDOG=1"]);
        assert_eq!(n.deadline(), Some(200));
    }

    #[test]
    fn reload_and_stop_are_said_once_each() {
        let (mut n, peer) = notifier(None);
        let mut log = Logger::new(LogLevel::Error);
        n.reloaded(&mut log);
        n.reloading(&mut log);
        n.reloading(&mut log);
        n.reloaded(&mut log);
        n.reloaded(&mut log);
        n.stopping(&mut log);
        n.stopping(&mut log);
        let got = received(&peer);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("RELOADING=1\nMONOTONIC_USEC="));
        assert_eq!(got[1..], ["READY=1", "STOPPING=1"]);
    }

    #[test]
    fn nothing_of_a_reload_follows_stopping() {
        let (mut n, peer) = notifier(None);
        let mut log = Logger::new(LogLevel::Error);
        n.reloading(&mut log);
        n.stopping(&mut log);
        n.reloaded(&mut log);
        n.reloading(&mut log);
        n.reloaded(&mut log);
        let got = received(&peer);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[1], "STOPPING=1");
    }

    #[test]
    fn a_full_socket_drops_the_datagram_without_blocking() {
        let (mut n, _peer) = notifier(None);
        let mut log = Logger::new(LogLevel::Error);
        // The peer never reads: sends soon find no room, and return.
        for _ in 0..10_000 {
            n.turn_end(u64::MAX, (0, 0), &mut log);
            if let Some(target) = &mut n.target {
                target.send("STATUS=filler", &mut log);
            }
        }
        assert!(n.target.as_ref().is_some_and(|t| !t.failing));
    }

    #[test]
    fn ready_and_stopping_wait_for_room_instead_of_being_dropped() {
        let (mut n, peer) = notifier(None);
        let mut log = Logger::new(LogLevel::Error);
        // Fill the peer's queue until a datagram finds no room.
        let mut filled = false;
        for _ in 0..100_000 {
            if let Some(target) = &mut n.target
                && !target.try_send("STATUS=filler", &mut log)
            {
                filled = true;
                break;
            }
        }
        assert!(filled, "the socket never filled");
        n.ready(10, (0, 0), &mut log);
        n.stopping(&mut log);
        n.turn_end(10, (0, 0), &mut log);
        assert_eq!(n.deadline(), Some(10 + OWED_RETRY_MS));
        // Still full: nothing is lost, the retry moves on.
        n.turn_end(10 + OWED_RETRY_MS, (0, 0), &mut log);
        assert_eq!(n.deadline(), Some(10 + 2 * OWED_RETRY_MS));
        let fillers = received(&peer);
        assert!(fillers.iter().all(|m| m == "STATUS=filler"), "{fillers:?}");
        n.turn_end(10 + 2 * OWED_RETRY_MS, (0, 0), &mut log);
        assert_eq!(
            received(&peer),
            ["READY=1\nSTATUS=queued=0 active=0", "STOPPING=1"]
        );
        assert_eq!(n.deadline(), None);
    }
}
