//! Parsers for the small value languages of flags and config keys: durations,
//! byte sizes, ports and addresses.
//!
//! Everything here is pure (no name resolution, no I/O) and total: any string
//! gives either a value or a [`UnitError`] that quotes it, never a panic.

use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

/// Parses a duration: `500ms`, `20s`, `5m`, `1h`, or a bare integer of
/// milliseconds (`20000`, as the 2011 tool took it).
///
/// `0` is accepted; callers give it the meaning "no limit". Durations above
/// [`MAX_DURATION`] are refused so that `now + duration` on a millisecond clock
/// can never overflow.
///
/// ```
/// use std::time::Duration;
/// use tcplock::internals::units::parse_duration;
///
/// assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
/// assert_eq!(parse_duration("20000"), Ok(Duration::from_secs(20)));
/// assert!(parse_duration("1.5s").is_err()); // whole numbers only
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let invalid = || UnitError::InvalidDuration(s.to_owned());
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let per_unit_ms: u64 = match suffix {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(invalid()),
    };
    let too_large = || UnitError::DurationTooLarge(s.to_owned());
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    let ms = n.checked_mul(per_unit_ms).ok_or_else(too_large)?;
    let duration = Duration::from_millis(ms);
    if duration > MAX_DURATION {
        return Err(too_large());
    }
    Ok(duration)
}

/// The longest duration any setting accepts: 100 years, far beyond any useful
/// timeout and far below what a `u64` millisecond clock can add without overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses a byte count: bare bytes, or a `k`/`K` (×1024) or `m`/`M` (×1024²)
/// suffix. Fails with [`UnitError::SizeTooLarge`] if the count overflows `usize`.
pub fn parse_size(s: &str) -> Result<usize, UnitError> {
    let n = parse_scaled(s, &[("k", 1 << 10), ("m", 1 << 20)])?;
    usize::try_from(n).map_err(|_| UnitError::SizeTooLarge(s.to_owned()))
}

/// Parses an amount of memory in bytes: bare bytes, or a `k`, `m` or `g`
/// suffix (any case, powers of 1024), as `--restart-rss` takes it.
///
/// ```
/// use tcplock::internals::units::parse_memory;
///
/// assert_eq!(parse_memory("1g"), Ok(1 << 30));
/// assert_eq!(parse_memory("512M"), Ok(512 << 20));
/// assert!(parse_memory("1.5g").is_err());
/// ```
pub fn parse_memory(s: &str) -> Result<u64, UnitError> {
    parse_scaled(s, &[("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)])
}

/// Digits, then nothing or one of `suffixes` (any case) multiplying them:
/// what [`parse_size`] and [`parse_memory`] share.
fn parse_scaled(s: &str, suffixes: &[(&str, u64)]) -> Result<u64, UnitError> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(UnitError::InvalidSize(s.to_owned()));
    }
    let multiplier = if suffix.is_empty() {
        1
    } else {
        suffixes
            .iter()
            .find(|(name, _)| suffix.eq_ignore_ascii_case(name))
            .map(|&(_, m)| m)
            .ok_or_else(|| UnitError::InvalidSize(s.to_owned()))?
    };
    let too_large = || UnitError::SizeTooLarge(s.to_owned());
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    n.checked_mul(multiplier).ok_or_else(too_large)
}

/// Parses a listen address: `PORT`, `HOST:PORT` or `[V6]:PORT`.
///
/// `PORT` alone means `127.0.0.1:PORT`: the 2011 tool bound every interface,
/// which exposed the guarded service to the network by default. Port 0 is
/// allowed (the kernel picks one). The result is `HOST:PORT` with an IPv6
/// literal bracketed, ready for `ToSocketAddrs`.
///
/// ```
/// use tcplock::internals::units::parse_listen;
///
/// assert_eq!(parse_listen("9000").unwrap(), "127.0.0.1:9000");
/// assert_eq!(parse_listen("[::1]:9000").unwrap(), "[::1]:9000");
/// assert!(parse_listen("::1:9000").is_err()); // IPv6 needs brackets
/// ```
pub fn parse_listen(s: &str) -> Result<String, UnitError> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let port = port_number(s).ok_or_else(|| UnitError::InvalidAddress {
            value: s.to_owned(),
            reason: "port must be 0-65535",
        })?;
        return Ok(format!("127.0.0.1:{port}"));
    }
    let (host, port) = split_host_port(s)?;
    let port = port_number(port).ok_or_else(|| UnitError::InvalidAddress {
        value: s.to_owned(),
        reason: "port must be 0-65535",
    })?;
    Ok(HostPort { host, port }.to_string())
}

/// An upstream address as the user wrote it; the name is resolved at start-up,
/// not here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPort {
    /// A host name or an IP literal; an IPv6 literal is kept without brackets.
    pub host: String,
    /// The port; never 0 when made by [`parse_host_port`].
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses an upstream address: `HOST:PORT` or `[V6]:PORT`, port 1-65535.
pub fn parse_host_port(s: &str) -> Result<HostPort, UnitError> {
    let (host, port) = split_host_port(s)?;
    match port_number(port) {
        Some(port) if port != 0 => Ok(HostPort { host, port }),
        _ => Err(UnitError::InvalidAddress {
            value: s.to_owned(),
            reason: "port must be 1-65535",
        }),
    }
}

/// Parses an upstream port, 1-65535.
pub fn parse_port(s: &str) -> Result<u16, UnitError> {
    match port_number(s) {
        Some(port) if port != 0 => Ok(port),
        _ => Err(UnitError::InvalidPort(s.to_owned())),
    }
}

/// Parses a host on its own (`-h`): a name, an IPv4 literal, or an IPv6
/// literal with or without brackets. Returns it without brackets.
pub fn parse_host(s: &str) -> Result<String, UnitError> {
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(s);
    check_host(unbracketed).map_err(|reason| UnitError::InvalidAddress {
        value: s.to_owned(),
        reason,
    })?;
    Ok(unbracketed.to_owned())
}

/// Why a value was refused; each variant holds the value as given. `Display`
/// is one short line that quotes the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitError {
    /// Not a duration in a known unit.
    InvalidDuration(String),
    /// Longer than [`MAX_DURATION`].
    DurationTooLarge(String),
    /// Not a byte count with a known suffix.
    InvalidSize(String),
    /// More bytes than `usize` holds.
    SizeTooLarge(String),
    /// Not a port in 1-65535.
    InvalidPort(String),
    /// Not a usable host, `HOST:PORT` or `[V6]:PORT`.
    InvalidAddress {
        /// The value as given.
        value: String,
        /// What is wrong with it, e.g. `"port must be 1-65535"`.
        reason: &'static str,
    },
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidDuration(v) => write!(
                f,
                "invalid duration {} (use 500ms, 20s, 5m, 1h or plain milliseconds)",
                Quoted(v)
            ),
            Self::DurationTooLarge(v) => {
                write!(f, "duration {} is too large (at most 100 years)", Quoted(v))
            }
            Self::InvalidSize(v) => write!(
                f,
                "invalid size {} (use bytes, or a k or m suffix as in 16k)",
                Quoted(v)
            ),
            Self::SizeTooLarge(v) => write!(f, "size {} is too large", Quoted(v)),
            Self::InvalidPort(v) => write!(f, "invalid port {} (use 1-65535)", Quoted(v)),
            Self::InvalidAddress { value, reason } => {
                write!(f, "invalid address {}: {reason}", Quoted(value))
            }
        }
    }
}

impl std::error::Error for UnitError {}

/// Displays a user-supplied value in single quotes, escaping control
/// characters so an error message always stays on one line.
pub(crate) struct Quoted<'a>(pub(crate) &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("'")?;
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        f.write_str("'")
    }
}

/// Splits `HOST:PORT` or `[V6]:PORT` and checks the host; the port is
/// returned unparsed because listen and upstream disagree about port 0.
fn split_host_port(s: &str) -> Result<(String, &str), UnitError> {
    let invalid = |reason| UnitError::InvalidAddress {
        value: s.to_owned(),
        reason,
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("missing ']' after the IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("expected [V6]:PORT"))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(invalid("not an IPv6 address inside the brackets"));
        }
        return Ok((host.to_owned(), port));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected HOST:PORT"))?;
    if host.contains(':') {
        return Err(invalid("put an IPv6 address in brackets: [V6]:PORT"));
    }
    check_host(host).map_err(invalid)?;
    Ok((host.to_owned(), port))
}

/// Accepts an IPv6 literal or something shaped like a host name or IPv4
/// address; anything else (spaces, slashes, a scheme) is surely a typo.
fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("empty host");
    }
    if host.contains(':') {
        return match host.parse::<Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err("not a valid IPv6 address"),
        };
    }
    if host.len() > 253 {
        return Err("host name too long");
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if !host.chars().all(name_char) {
        return Err("host may hold only letters, digits, '-', '.' and '_'");
    }
    Ok(())
}

/// A port written as plain decimal digits, 0-65535.
fn port_number(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("20000"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn bad_durations_are_refused_with_the_value_quoted() {
        for bad in [
            "", "-5", "+5", "1.5s", "5x", "s", "ms", "5 s", " 5s", "5S", "5sec", "1d", "5m5s",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert_eq!(err, UnitError::InvalidDuration(bad.to_owned()));
        }
        assert_eq!(
            parse_duration("5x").unwrap_err().to_string(),
            "invalid duration '5x' (use 500ms, 20s, 5m, 1h or plain milliseconds)"
        );
    }

    #[test]
    fn huge_durations_overflow_cleanly() {
        for big in [
            "99999999999999999999999",
            "18446744073709551615h",
            "5124095576030431h",
            "876001h",
        ] {
            assert_eq!(
                parse_duration(big),
                Err(UnitError::DurationTooLarge(big.to_owned()))
            );
        }
        assert_eq!(parse_duration("876000h"), Ok(MAX_DURATION));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16k"), Ok(16384));
        assert_eq!(parse_size("16K"), Ok(16384));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        for bad in ["", "k", "16kb", "1.5k", "-1", "16 k", "16g", "16KiB"] {
            assert_eq!(parse_size(bad), Err(UnitError::InvalidSize(bad.to_owned())));
        }
        let huge = format!("{}m", usize::MAX);
        assert_eq!(
            parse_size(&huge),
            Err(UnitError::SizeTooLarge(huge.clone()))
        );
        assert!(parse_size("99999999999999999999999999").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("9000").as_deref(), Ok("127.0.0.1:9000"));
        assert_eq!(parse_listen("0").as_deref(), Ok("127.0.0.1:0"));
        assert_eq!(parse_listen("0.0.0.0:9000").as_deref(), Ok("0.0.0.0:9000"));
        assert_eq!(parse_listen("localhost:0").as_deref(), Ok("localhost:0"));
        assert_eq!(parse_listen("[::1]:9000").as_deref(), Ok("[::1]:9000"));
        assert_eq!(parse_listen("[::]:80").as_deref(), Ok("[::]:80"));
        for bad in [
            "",
            ":9000",
            "65536",
            "host:",
            "host:65536",
            "host:x",
            "::1:9000",
            "[::1]",
            "[::1]9000",
            "[nope]:9000",
            "[::1:9000",
            "a b:1",
            "http://x:1",
            "host:-1",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn upstream_addresses() {
        let hp = parse_host_port("db.local:5432").unwrap();
        assert_eq!(
            hp,
            HostPort {
                host: "db.local".into(),
                port: 5432
            }
        );
        assert_eq!(hp.to_string(), "db.local:5432");
        let v6 = parse_host_port("[fe80::1]:8100").unwrap();
        assert_eq!(v6.host, "fe80::1");
        assert_eq!(v6.to_string(), "[fe80::1]:8100");
        for bad in [
            "", "8100", "db:0", "db:65536", ":80", "db", "::1:80", "db:80x",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_host_port("db:0").unwrap_err().to_string(),
            "invalid address 'db:0': port must be 1-65535"
        );
    }

    #[test]
    fn ports_and_hosts() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in ["", "0", "65536", "+80", "80 ", "http"] {
            assert_eq!(parse_port(bad), Err(UnitError::InvalidPort(bad.to_owned())));
        }
        assert_eq!(parse_host("localhost").as_deref(), Ok("localhost"));
        assert_eq!(parse_host("::1").as_deref(), Ok("::1"));
        assert_eq!(parse_host("[::1]").as_deref(), Ok("::1"));
        assert!(parse_host("").is_err());
        assert!(parse_host("a b").is_err());
        assert!(parse_host("1:2").is_err());
    }

    #[test]
    fn quoted_values_stay_on_one_line() {
        let msg = parse_duration("5\nx").unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(r"'5\nx'"), "{msg}");
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let samples = [
            "",
            "[",
            "]",
            "[]",
            "[]:",
            "[:]:1",
            ":",
            "::",
            "\u{0}",
            "é:1",
            "[é]:1",
            "9\u{301}",
            "\u{10FFFF}h",
            "1\u{0}s",
            "[::1]:\u{ff10}",
            "٣",
            "1٣s",
            "1ms\n",
        ];
        for s in samples {
            let _ = parse_duration(s);
            let _ = parse_size(s);
            let _ = parse_listen(s);
            let _ = parse_host_port(s);
            let _ = parse_port(s);
            let _ = parse_host(s);
        }
    }
}
