//! logfmt lines on stderr: `ts=… level=… event=… conn=…`.
//!
//! Lines are formatted into one buffer and written with one `write` per loop
//! turn ([`Logger::flush`]), never a syscall per line or field. The write
//! never blocks: a stderr nobody drains (a stuck journald or container log
//! pipe) costs a bounded buffer and dropped lines, never the loop.

use std::fmt::{self, Display, Write as _};
use std::io;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::LogLevel;
use crate::core::{Event, ServiceExit};
use crate::sys::LogSink;

/// Most bytes of log held while stderr takes none; lines beyond it are
/// dropped and counted.
pub const LOG_BUFFER_BYTES: usize = 256 * 1024;
/// How long the last lines may wait for a stalled stderr at exit.
const EXIT_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Buffered logfmt writer.
pub struct Logger {
    level: LogLevel,
    /// Lines not yet taken by stderr, at most about [`LOG_BUFFER_BYTES`].
    buf: String,
    /// Lines dropped since the buffer was last full; reported by the first
    /// line that fits afterwards.
    dropped: u64,
    /// Lines dropped and already reported, for the metrics.
    dropped_reported: u64,
    sink: LogSink,
}

impl Logger {
    /// An empty logger that writes lines at `level` and more severe ones.
    pub fn new(level: LogLevel) -> Self {
        Logger {
            level,
            buf: String::with_capacity(4096),
            dropped: 0,
            dropped_reported: 0,
            sink: LogSink::stderr(),
        }
    }

    /// The descriptor to watch for room while lines are waiting, if stderr
    /// is something the poll can watch ([`Logger::flush`] when it has room).
    pub fn watch_fd(&self) -> Option<i32> {
        self.sink.watch_fd()
    }

    /// Whether lines are waiting for stderr to take them.
    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Lines dropped so far, reported or not.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_reported + self.dropped
    }

    /// Changes the level for lines started from now on.
    pub fn set_level(&mut self, level: LogLevel) {
        self.level = level;
    }

    /// Whether a line at `level` would be written: it is at most as verbose as
    /// the logger's level.
    pub fn enabled(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    /// Starts a line, or returns `None` when `level` is filtered out (so callers
    /// skip formatting the fields too).
    pub fn line(&mut self, level: LogLevel, event: &str) -> Option<Line<'_>> {
        if !self.enabled(level) {
            return None;
        }
        if self.dropped > 0 {
            self.report_dropped();
        }
        // No line fits a full buffer: counted without being formatted, which
        // keeps a flood of lines (a chatty service) cheap while stderr stalls.
        if self.buf.len() >= LOG_BUFFER_BYTES {
            self.dropped += 1;
            return None;
        }
        let line = Line {
            start: self.buf.len(),
            buf: &mut self.buf,
            dropped: &mut self.dropped,
        };
        line.buf.push_str("ts=");
        write_timestamp(line.buf, SystemTime::now());
        line.buf.push_str(" level=");
        line.buf.push_str(level.as_str());
        line.buf.push_str(" event=");
        line.buf.push_str(event);
        Some(line)
    }

    /// Writes one line for an event of the core.
    pub fn event(&mut self, event: &Event) {
        let (level, name) = level_and_name(event);
        let Some(line) = self.line(level, name) else {
            return;
        };
        match event {
            Event::Accepted { conn, client, via } => line
                .field("conn", conn)
                .field("client", client)
                .field_opt("via", via.as_ref()),
            Event::Rejected {
                conn,
                client,
                reason,
            } => line
                .field("conn", conn)
                .field("client", client)
                .field("reason", reason.as_str()),
            Event::Abandoned { conn } | Event::Timeout { conn } | Event::QueueTimeout { conn } => {
                line.field("conn", conn)
            }
            Event::Activated {
                conn,
                client,
                via,
                waited_ms,
                instance,
            } => line
                .field("conn", conn)
                .field("client", client)
                .field_opt("via", via.as_ref())
                .field("waited_ms", waited_ms)
                .field("instance", instance),
            Event::Killed { conn, state } => {
                line.field("conn", conn).field("state", state.as_str())
            }
            Event::Paused { queued } | Event::Resumed { queued } => line.field("queued", queued),
            Event::ConnectFailed {
                conn,
                error,
                instance,
            } => line
                .field("conn", conn)
                .field("error", error)
                .field("instance", instance),
            Event::Requeued { conn, instance } => {
                line.field("conn", conn).field("instance", instance)
            }
            Event::InstanceCooldown { instance, ms } => {
                line.field("instance", instance).field("ms", ms)
            }
            Event::HookFailed {
                hook,
                kind,
                conn,
                exit,
                timed_out,
                retry_in_ms,
                instance,
            } => {
                let mut line = line
                    .field("hook", hook)
                    .field("kind", kind.as_str())
                    .field("conn", conn)
                    .field("status", exit);
                if *timed_out {
                    line = line.field("reason", "hook_timeout");
                }
                line.field_opt("retry_in_ms", retry_in_ms.as_ref())
                    .field("instance", instance)
            }
            Event::HookTimedOut { hook, after_ms } => {
                line.field("hook", hook).field("after_ms", after_ms)
            }
            Event::PreparationKept { hook } => line.field("hook", hook),
            Event::ShutdownStarted {
                queued,
                active,
                grace_ms,
            } => line
                .field("queued", queued)
                .field("active", active)
                .field("grace_ms", grace_ms),
            Event::ShutdownForced { active } => line.field("active", active),
            Event::ShutdownDone { served, closed } => {
                line.field("served", served).field("closed", closed)
            }
            Event::QueueStalled {
                waited_ms,
                holders,
                idle_ms,
            } => line
                .field("waited_ms", waited_ms)
                .field("holders", holders)
                .field("idle_ms", idle_ms)
                .field(
                    "hint",
                    "a client may hold more connections than there are permits; \
                     see --queue-timeout",
                ),
            Event::State {
                conn,
                state,
                client,
                age_ms,
            } => line
                .field("conn", conn)
                .field("state", state.as_str())
                .field("client", client)
                .field("age_ms", age_ms),
            Event::StateSummary {
                queued,
                active,
                permits,
                instances,
                hook_running,
                activations,
                timeouts,
            } => line
                .field("queued", queued)
                .field("active", active)
                .field("permits", permits)
                .field("hook_running", hook_running)
                .field("activations", activations)
                .field("timeouts", timeouts)
                .field("instances", instances),
            Event::UpstreamStarting {
                generation,
                pid,
                reason,
                instance,
            } => line
                .field("gen", generation)
                .field("pid", pid)
                .field("reason", reason)
                .field("instance", instance),
            Event::UpstreamReady {
                generation,
                start_ms,
                instance,
            } => line
                .field("gen", generation)
                .field("start_ms", start_ms)
                .field("instance", instance),
            Event::RestartDue {
                generation,
                reason,
                rss_kib,
                instance,
            } => {
                let line = line.field("gen", generation).field("reason", reason);
                let line = match rss_kib {
                    Some((rss, limit)) => line.field("rss_kib", rss).field("limit_kib", limit),
                    None => line,
                };
                line.field("instance", instance)
            }
            Event::UpstreamStopping {
                generation,
                reason,
                instance,
            } => line
                .field("gen", generation)
                .field("reason", reason)
                .field("instance", instance),
            Event::UpstreamExited {
                generation,
                pid,
                exit,
                expected,
                instance,
            } => line
                .field("gen", generation)
                .field("pid", pid)
                .field("status", ServiceStatus(*exit))
                .field("expected", expected)
                .field("instance", instance),
            Event::UpstreamStartFailed {
                generation,
                why,
                instance,
            } => line
                .field("gen", generation)
                .field("why", why)
                .field("instance", instance),
            Event::UpstreamFailed {
                starts,
                retry_in_ms,
                instance,
            } => line
                .field("starts", starts)
                .field("retry_in_ms", retry_in_ms)
                .field("instance", instance),
            Event::UpstreamPortBusy {
                generation,
                addr,
                instance,
            } => line
                .field("gen", generation)
                .field("addr", addr)
                .field("instance", instance),
            Event::ServiceState {
                instance,
                state,
                generation,
                pid,
                rss_kib,
                conns,
                age_ms,
            } => line
                .field("service", "upstream")
                .field("state", state)
                .field("gen", generation)
                .field_opt("pid", pid.as_ref())
                .field("rss_kib", rss_kib)
                .field("conns", conns)
                .field_opt("age_ms", age_ms.as_ref())
                .field("instance", instance),
        };
    }

    /// `level=warn event=log_dropped lines=N`, once there is room for it.
    fn report_dropped(&mut self) {
        const ROOM: usize = 128;
        if self.buf.len() + ROOM > LOG_BUFFER_BYTES {
            return;
        }
        let dropped = std::mem::take(&mut self.dropped);
        self.dropped_reported += dropped;
        if !self.enabled(LogLevel::Warn) {
            return;
        }
        let line = Line {
            start: self.buf.len(),
            buf: &mut self.buf,
            // Room was checked: this line is never dropped itself.
            dropped: &mut 0,
        };
        line.buf.push_str("ts=");
        write_timestamp(line.buf, SystemTime::now());
        line.buf.push_str(" level=warn event=log_dropped");
        line.field("lines", dropped);
    }

    /// Writes what stderr takes now, without blocking; the rest waits for the
    /// next call. A failing stderr loses the lines rather than the proxy.
    pub fn flush(&mut self) {
        let mut written = 0;
        while written < self.buf.len() {
            match self.sink.write(&self.buf.as_bytes()[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    written = self.buf.len();
                    break;
                }
            }
        }
        if written == self.buf.len() {
            self.buf.clear();
        } else {
            // A write may stop inside a line: the rest of it goes next time.
            self.buf.drain(..written);
        }
        if self.buf.is_empty() && self.buf.capacity() > 2 * LOG_BUFFER_BYTES {
            // A burst (a state dump of thousands of connections) should not pin
            // its memory for the life of the process.
            self.buf.shrink_to(4096);
        }
    }

    /// Flushes what is left, waiting for a stalled stderr at most
    /// [`EXIT_FLUSH_WAIT`] in all.
    fn flush_before_exit(&mut self) {
        // Outside the loop SIGPIPE is not blocked, and a stderr pipe whose
        // reader is gone would raise it: a host with SIGPIPE at its default
        // must not die of its last log lines.
        let _sigpipe = crate::sys::block_sigpipe();
        let deadline = Instant::now() + EXIT_FLUSH_WAIT;
        loop {
            self.flush();
            let left = deadline.saturating_duration_since(Instant::now());
            if self.buf.is_empty() || left.is_zero() {
                return;
            }
            let wait_ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            if !self.sink.wait_writable(wait_ms) && Instant::now() >= deadline {
                return;
            }
        }
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.flush_before_exit();
    }
}

/// `exit:N` or `signal:NAME`, as `upstream_exited` reports a status.
struct ServiceStatus(ServiceExit);

impl Display for ServiceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            ServiceExit::Code(code) => write!(f, "exit:{code}"),
            ServiceExit::Signal(signal) => match signal_name(signal) {
                Some(name) => write!(f, "signal:{name}"),
                None => write!(f, "signal:{signal}"),
            },
        }
    }
}

/// The usual name of a signal that ends a service, without the `SIG`.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "HUP",
        libc::SIGINT => "INT",
        libc::SIGQUIT => "QUIT",
        libc::SIGILL => "ILL",
        libc::SIGABRT => "ABRT",
        libc::SIGBUS => "BUS",
        libc::SIGFPE => "FPE",
        libc::SIGKILL => "KILL",
        libc::SIGSEGV => "SEGV",
        libc::SIGPIPE => "PIPE",
        libc::SIGALRM => "ALRM",
        libc::SIGTERM => "TERM",
        libc::SIGUSR1 => "USR1",
        libc::SIGUSR2 => "USR2",
        _ => return None,
    })
}

fn level_and_name(event: &Event) -> (LogLevel, &'static str) {
    match event {
        Event::Accepted { .. } => (LogLevel::Debug, "accepted"),
        Event::Rejected { .. } => (LogLevel::Info, "rejected"),
        Event::Killed { .. } => (LogLevel::Info, "killed"),
        Event::Paused { .. } => (LogLevel::Info, "paused"),
        Event::Resumed { .. } => (LogLevel::Info, "resumed"),
        Event::Abandoned { .. } => (LogLevel::Info, "abandoned"),
        Event::Activated { .. } => (LogLevel::Info, "activated"),
        Event::Timeout { .. } => (LogLevel::Info, "timeout"),
        Event::QueueTimeout { .. } => (LogLevel::Info, "queue_timeout"),
        Event::ConnectFailed { .. } => (LogLevel::Info, "connect_failed"),
        Event::InstanceCooldown { .. } => (LogLevel::Warn, "instance_cooldown"),
        Event::Requeued { .. } => (LogLevel::Debug, "requeued"),
        Event::HookFailed { .. } => (LogLevel::Warn, "hook_failed"),
        Event::HookTimedOut { .. } => (LogLevel::Warn, "hook_timeout"),
        Event::PreparationKept { .. } => (LogLevel::Info, "preparation_kept"),
        Event::ShutdownStarted { .. } => (LogLevel::Info, "shutdown_started"),
        Event::ShutdownForced { .. } => (LogLevel::Warn, "shutdown_forced"),
        Event::ShutdownDone { .. } => (LogLevel::Info, "shutdown_done"),
        Event::QueueStalled { .. } => (LogLevel::Warn, "queue_stalled"),
        Event::State { .. } => (LogLevel::Info, "state"),
        Event::StateSummary { .. } => (LogLevel::Info, "state_summary"),
        Event::UpstreamStarting { .. } => (LogLevel::Info, "upstream_starting"),
        Event::UpstreamReady { .. } => (LogLevel::Info, "upstream_ready"),
        Event::RestartDue { .. } => (LogLevel::Info, "restart_due"),
        Event::UpstreamStopping { .. } => (LogLevel::Info, "upstream_stopping"),
        Event::UpstreamExited {
            expected: false, ..
        } => (LogLevel::Warn, "upstream_exited"),
        Event::UpstreamExited { .. } => (LogLevel::Info, "upstream_exited"),
        Event::UpstreamStartFailed { .. } => (LogLevel::Warn, "upstream_start_failed"),
        Event::UpstreamFailed { .. } => (LogLevel::Error, "upstream_failed"),
        Event::UpstreamPortBusy { .. } => (LogLevel::Error, "upstream_port_busy"),
        Event::ServiceState { .. } => (LogLevel::Info, "state"),
    }
}

/// One log line under construction; the newline is added when it is dropped,
/// and the whole line is taken back then if it overfills the buffer.
pub struct Line<'a> {
    buf: &'a mut String,
    /// Where this line starts in `buf`.
    start: usize,
    dropped: &'a mut u64,
}

impl Line<'_> {
    /// Appends ` key=value`, quoting the value when logfmt needs it.
    pub fn field(self, key: &str, value: impl Display) -> Self {
        self.buf.push(' ');
        self.buf.push_str(key);
        self.buf.push('=');
        push_value(self.buf, value);
        self
    }

    /// Appends the field only when there is a value.
    pub fn field_opt(self, key: &str, value: Option<impl Display>) -> Self {
        match value {
            Some(value) => self.field(key, value),
            None => self,
        }
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        self.buf.push('\n');
        if self.buf.len() > LOG_BUFFER_BYTES {
            self.buf.truncate(self.start);
            *self.dropped += 1;
        }
    }
}

/// Appends a logfmt value, quoted when logfmt needs it; log lines and
/// control replies share it.
pub(super) fn push_value(buf: &mut String, value: impl Display) {
    let start = buf.len();
    let _ = write!(buf, "{value}");
    let needs_quotes = start == buf.len()
        || buf[start..]
            .bytes()
            .any(|b| b <= b' ' || b == b'"' || b == b'=' || b == b'\\' || b == 0x7f);
    if needs_quotes {
        let raw = buf.split_off(start);
        buf.push('"');
        for ch in raw.chars() {
            match ch {
                '"' => buf.push_str("\\\""),
                '\\' => buf.push_str("\\\\"),
                '\n' => buf.push_str("\\n"),
                '\r' => buf.push_str("\\r"),
                '\t' => buf.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(buf, "\\u{{{:x}}}", c as u32);
                }
                c => buf.push(c),
            }
        }
        buf.push('"');
    }
}

/// `2026-11-26T07:00:00.123Z`: UTC with milliseconds.
fn write_timestamp(out: &mut String, now: SystemTime) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since_epoch.subsec_millis()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`), so timestamps need no time crate.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A value shown as `a,b,c`.
pub struct CommaList<'a>(pub &'a [&'a str]);

impl Display for CommaList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(item)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let mut out = String::new();
        write_timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_795_676_400_123),
        );
        assert_eq!(out, "2026-11-26T07:00:00.123Z");
        out.clear();
        write_timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(out, "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn values_with_spaces_or_quotes_are_quoted() {
        let mut logger = Logger::new(LogLevel::Info);
        if let Some(line) = logger.line(LogLevel::Info, "x") {
            line.field("a", 1)
                .field("b", "two words")
                .field("c", "say \"hi\"")
                .field("d", "");
        }
        let text = logger.buf.clone();
        logger.buf.clear();
        assert!(text.ends_with(" event=x a=1 b=\"two words\" c=\"say \\\"hi\\\"\" d=\"\"\n"));
    }

    #[test]
    fn lines_past_the_buffer_are_dropped_counted_and_reported() {
        let mut logger = Logger::new(LogLevel::Info);
        let long = "x".repeat(1000);
        for _ in 0..300 {
            if let Some(line) = logger.line(LogLevel::Info, "filler") {
                line.field("v", &long);
            }
        }
        assert!(logger.buf.len() <= LOG_BUFFER_BYTES);
        assert!(logger.buf.ends_with('\n'), "only whole lines are kept");
        let dropped = logger.dropped;
        assert!(dropped > 0);
        // stderr took everything: the next line is preceded by the count.
        logger.buf.clear();
        if let Some(line) = logger.line(LogLevel::Info, "after") {
            line.field("a", 1);
        }
        let text = std::mem::take(&mut logger.buf);
        let mut lines = text.lines();
        let report = lines.next().unwrap_or_default();
        assert!(
            report.contains(" level=warn event=log_dropped ")
                && report.ends_with(&format!(" lines={dropped}")),
            "{report}"
        );
        assert!(
            lines
                .next()
                .unwrap_or_default()
                .contains(" event=after a=1")
        );
        assert_eq!(logger.dropped, 0);
    }

    #[test]
    fn filtered_levels_write_nothing() {
        let mut logger = Logger::new(LogLevel::Info);
        assert!(logger.line(LogLevel::Debug, "x").is_none());
        assert!(logger.buf.is_empty());
    }
}
