//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`), versions 1 and 2,
//! TCP over IPv4 and IPv6: pure encoding and parsing, no I/O.
//!
//! [`encode`] writes the header `--send-proxy` puts before a client's first
//! byte on the upstream connection; [`parse`] reads one from the start of a
//! byte slice and says exactly how long it is, so a caller that peeked at a
//! socket can consume the header and nothing after it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 header, `\r\n` included (the spec's 107 bytes).
pub const V1_MAX_LEN: usize = 107;

/// The longest header [`parse`] accepts: the spec's advice to receivers,
/// which covers both versions' addresses with room for a few TLVs. A
/// version 2 header announcing more is refused as oversized.
pub const MAX_HEADER_LEN: usize = 536;

/// Fixed part of a version 2 header: signature, version and command,
/// family and protocol, length.
const V2_FIXED_LEN: usize = 16;

/// Which version of the header to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Human-readable text, `PROXY TCP4 ...\r\n`.
    V1,
    /// Binary, with the 12-byte signature.
    V2,
}

/// The two ends of a client's connection, as a header carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

/// A header read by [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// How many bytes the header takes, from the start of the input.
    pub len: usize,
    /// The addresses it carries; `None` for a v2 `LOCAL` command or a v1
    /// `UNKNOWN` (a balancer's own connection, such as a health check), and
    /// for v2 families other than TCP over IPv4/IPv6.
    pub addresses: Option<Addresses>,
}

/// Why [`parse`] could not read a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// What is there is a valid beginning: more bytes are needed.
    Incomplete,
    /// The header would be longer than [`MAX_HEADER_LEN`] (or a v1 line
    /// longer than [`V1_MAX_LEN`]).
    Oversized,
    /// Not a PROXY header, or a malformed one; the reason names the part.
    Malformed(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Incomplete => f.write_str("incomplete header"),
            ParseError::Oversized => f.write_str("header too long"),
            ParseError::Malformed(reason) => write!(f, "malformed header: {reason}"),
        }
    }
}

/// An encoded header, kept inline: the longest one (v1 with two IPv6
/// addresses) is well under [`V1_MAX_LEN`] bytes.
#[derive(Clone, Copy)]
pub struct Header {
    bytes: [u8; V1_MAX_LEN],
    len: usize,
}

impl Header {
    /// The header's bytes, to be written before anything else.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn push(&mut self, data: &[u8]) {
        // Every caller writes well under the capacity; never panic anyway.
        let end = (self.len + data.len()).min(self.bytes.len());
        let n = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&data[..n]);
        self.len = end;
    }
}

impl fmt::Write for Header {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.bytes.len() {
            return Err(fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Header({:?})", self.as_bytes())
    }
}

/// The header for a connection from `addresses.source` to
/// `addresses.destination`, or the "unknown origin" header (v1 `UNKNOWN`,
/// v2 `LOCAL`) when `addresses` is `None`. Two addresses of different
/// families are both written as IPv6 (an IPv4 one mapped), as the spec asks
/// of a header that carries one family.
pub fn encode(version: Version, addresses: Option<Addresses>) -> Header {
    let mut header = Header {
        bytes: [0; V1_MAX_LEN],
        len: 0,
    };
    let pair = addresses.map(|a| same_family(a.source, a.destination));
    match version {
        Version::V1 => {
            use fmt::Write;
            // Cannot fail: the longest line is 104 bytes.
            let _ = match pair {
                None => header.write_str("PROXY UNKNOWN\r\n"),
                Some((src, dst)) => {
                    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
                    write!(
                        header,
                        "PROXY {family} {} {} {} {}\r\n",
                        src.ip(),
                        dst.ip(),
                        src.port(),
                        dst.port()
                    )
                }
            };
        }
        Version::V2 => {
            header.push(&V2_SIGNATURE);
            match pair {
                None => header.push(&[0x20, 0x00, 0, 0]),
                Some((SocketAddr::V4(src), SocketAddr::V4(dst))) => {
                    header.push(&[0x21, 0x11, 0, 12]);
                    header.push(&src.ip().octets());
                    header.push(&dst.ip().octets());
                    header.push(&src.port().to_be_bytes());
                    header.push(&dst.port().to_be_bytes());
                }
                Some((src, dst)) => {
                    header.push(&[0x21, 0x21, 0, 36]);
                    header.push(&v6_octets(src.ip()));
                    header.push(&v6_octets(dst.ip()));
                    header.push(&src.port().to_be_bytes());
                    header.push(&dst.port().to_be_bytes());
                }
            }
        }
    }
    header
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    if src.is_ipv4() == dst.is_ipv4() {
        return (src, dst);
    }
    let v6 =
        |a: SocketAddr| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(v6_octets(a.ip()))), a.port());
    (v6(src), v6(dst))
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Reads the PROXY header (v1 or v2) at the start of `input`. Never looks
/// past the header: `Parsed::len` is exactly its length.
pub fn parse(input: &[u8]) -> Result<Parsed, ParseError> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let v2_known = input.len().min(V2_SIGNATURE.len());
    let v1_known = input.len().min(V1_PREFIX.len());
    if input.is_empty() {
        Err(ParseError::Incomplete)
    } else if input[..v2_known] == V2_SIGNATURE[..v2_known] {
        parse_v2(input)
    } else if input[..v1_known] == V1_PREFIX[..v1_known] {
        parse_v1(input)
    } else {
        Err(ParseError::Malformed("no PROXY signature"))
    }
}

fn parse_v1(input: &[u8]) -> Result<Parsed, ParseError> {
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if input.len() >= V1_MAX_LEN {
            Err(ParseError::Oversized)
        } else {
            Err(ParseError::Incomplete)
        };
    };
    if window[cr] == b'\n' {
        return Err(ParseError::Malformed("v1 line ends without \\r"));
    }
    match window.get(cr + 1) {
        None if input.len() < V1_MAX_LEN => return Err(ParseError::Incomplete),
        None => return Err(ParseError::Oversized),
        Some(b'\n') => {}
        _ => return Err(ParseError::Malformed("v1 \\r not followed by \\n")),
    }
    let len = cr + 2;
    let line = std::str::from_utf8(&input[..cr])
        .map_err(|_| ParseError::Malformed("v1 line is not text"))?;
    let mut words = line.split(' ');
    words.next(); // "PROXY", checked by `parse`
    let family = words.next().ok_or(ParseError::Malformed("v1 family"))?;
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored.
        return Ok(Parsed {
            len,
            addresses: None,
        });
    }
    let v4 = match family {
        "TCP4" => true,
        "TCP6" => false,
        _ => {
            return Err(ParseError::Malformed(
                "v1 family is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let mut next = |what| words.next().ok_or(ParseError::Malformed(what));
    let src_ip = parse_ip(next("v1 source address")?, v4)?;
    let dst_ip = parse_ip(next("v1 destination address")?, v4)?;
    let src_port = parse_port(next("v1 source port")?)?;
    let dst_port = parse_port(next("v1 destination port")?)?;
    if words.next().is_some() {
        return Err(ParseError::Malformed("v1 line has extra fields"));
    }
    Ok(Parsed {
        len,
        addresses: Some(Addresses {
            source: SocketAddr::new(src_ip, src_port),
            destination: SocketAddr::new(dst_ip, dst_port),
        }),
    })
}

fn parse_ip(text: &str, v4: bool) -> Result<IpAddr, ParseError> {
    if v4 {
        text.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ParseError::Malformed("v1 address is not IPv4"))
    } else {
        text.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ParseError::Malformed("v1 address is not IPv6"))
    }
}

fn parse_port(text: &str) -> Result<u16, ParseError> {
    // Digits only, no leading zero: `u16::from_str` would take "+80" and "080".
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(ParseError::Malformed("v1 port"));
    }
    text.parse()
        .map_err(|_| ParseError::Malformed("v1 port out of range"))
}

fn parse_v2(input: &[u8]) -> Result<Parsed, ParseError> {
    if input.len() < V2_FIXED_LEN {
        // Check what is there already, so garbage is not waited for.
        if let Some(&ver_cmd) = input.get(12) {
            check_v2_version(ver_cmd)?;
        }
        return Err(ParseError::Incomplete);
    }
    let ver_cmd = input[12];
    let fam = input[13];
    check_v2_version(ver_cmd)?;
    let body_len = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let len = V2_FIXED_LEN + body_len;
    if len > MAX_HEADER_LEN {
        return Err(ParseError::Oversized);
    }
    if input.len() < len {
        return Err(ParseError::Incomplete);
    }
    let body = &input[V2_FIXED_LEN..len];
    let local = ver_cmd & 0x0f == 0;
    let (v4, need) = match fam {
        0x11 => (true, 12),
        0x21 => (false, 36),
        // UNSPEC, UDP, UNIX: the addresses are not ours to use.
        _ => {
            return Ok(Parsed {
                len,
                addresses: None,
            });
        }
    };
    if body.len() < need {
        return Err(ParseError::Malformed("v2 address block too short"));
    }
    if local {
        // LOCAL: the receiver must ignore the address block.
        return Ok(Parsed {
            len,
            addresses: None,
        });
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let addresses = if v4 {
        let ip = |at: usize| {
            IpAddr::V4(Ipv4Addr::new(
                body[at],
                body[at + 1],
                body[at + 2],
                body[at + 3],
            ))
        };
        Addresses {
            source: SocketAddr::new(ip(0), port(8)),
            destination: SocketAddr::new(ip(4), port(10)),
        }
    } else {
        let ip = |at: usize| {
            let mut octets = [0; 16];
            octets.copy_from_slice(&body[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        Addresses {
            source: SocketAddr::new(ip(0), port(32)),
            destination: SocketAddr::new(ip(16), port(34)),
        }
    };
    Ok(Parsed {
        len,
        addresses: Some(addresses),
    })
}

fn check_v2_version(ver_cmd: u8) -> Result<(), ParseError> {
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::Malformed("v2 version is not 2"));
    }
    if ver_cmd & 0x0f > 1 {
        return Err(ParseError::Malformed("v2 command is not LOCAL or PROXY"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(src: &str, dst: &str) -> Addresses {
        Addresses {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    #[test]
    fn v1_ipv4_is_the_specs_line() {
        let a = addrs("192.168.0.1:56324", "192.168.0.11:443");
        let header = encode(Version::V1, Some(a));
        assert_eq!(
            header.as_bytes(),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let parsed = parse(header.as_bytes()).unwrap();
        assert_eq!(parsed.len, header.as_bytes().len());
        assert_eq!(parsed.addresses, Some(a));
    }

    #[test]
    fn v1_ipv6_and_unknown() {
        let a = addrs("[2001:db8::1]:1000", "[::1]:80");
        let header = encode(Version::V1, Some(a));
        assert_eq!(header.as_bytes(), b"PROXY TCP6 2001:db8::1 ::1 1000 80\r\n");
        assert_eq!(parse(header.as_bytes()).unwrap().addresses, Some(a));
        assert_eq!(encode(Version::V1, None).as_bytes(), b"PROXY UNKNOWN\r\n");
        let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nGET /";
        assert_eq!(
            parse(unknown),
            Ok(Parsed {
                len: unknown.len() - 5,
                addresses: None
            })
        );
    }

    #[test]
    fn longest_v1_line_fits() {
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let a = addrs(&format!("[{ip}]:65535"), &format!("[{ip}]:65535"));
        let header = encode(Version::V1, Some(a));
        assert_eq!(header.as_bytes().len(), 104);
        assert_eq!(parse(header.as_bytes()).unwrap().addresses, Some(a));
    }

    #[test]
    fn v2_ipv4_ipv6_and_local_are_byte_exact() {
        let a = addrs("10.0.0.1:256", "10.0.0.2:80");
        let header = encode(Version::V2, Some(a));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 1, 0, 0, 80]);
        assert_eq!(header.as_bytes(), &want[..]);
        assert_eq!(parse(&want).unwrap().addresses, Some(a));

        let a = addrs("[::1]:1", "[::2]:2");
        let header = encode(Version::V2, Some(a));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0, 36]);
        want.extend_from_slice(&[0; 15]);
        want.push(1);
        want.extend_from_slice(&[0; 15]);
        want.push(2);
        want.extend_from_slice(&[0, 1, 0, 2]);
        assert_eq!(header.as_bytes(), &want[..]);
        assert_eq!(parse(&want).unwrap().addresses, Some(a));

        let local = encode(Version::V2, None);
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x20, 0, 0, 0]);
        assert_eq!(local.as_bytes(), &want[..]);
        assert_eq!(
            parse(&want),
            Ok(Parsed {
                len: 16,
                addresses: None
            })
        );
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let a = addrs("1.2.3.4:5", "[::1]:6");
        let header = encode(Version::V1, Some(a));
        assert_eq!(header.as_bytes(), b"PROXY TCP6 ::ffff:1.2.3.4 ::1 5 6\r\n");
    }

    #[test]
    fn v2_tlvs_count_in_the_length_and_nothing_after_is_taken() {
        let a = addrs("10.0.0.1:1", "10.0.0.2:2");
        let mut bytes = encode(Version::V2, Some(a)).as_bytes().to_vec();
        bytes[15] = 12 + 4;
        bytes.extend_from_slice(&[0x04, 0, 1, 0xaa]); // a NOOP TLV
        bytes.extend_from_slice(b"client bytes");
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.len, 32);
        assert_eq!(parsed.addresses, Some(a));
    }

    #[test]
    fn every_prefix_of_a_good_header_is_incomplete() {
        let a = addrs("[2001:db8::1]:1000", "[::1]:80");
        for version in [Version::V1, Version::V2] {
            let header = encode(version, Some(a));
            let bytes = header.as_bytes();
            for end in 0..bytes.len() {
                assert_eq!(
                    parse(&bytes[..end]),
                    Err(ParseError::Incomplete),
                    "{version:?} {end}"
                );
            }
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let malformed = |input: &[u8]| matches!(parse(input), Err(ParseError::Malformed(_)));
        assert!(malformed(b"GET / HTTP/1.0\r\n"));
        assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"));
        assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"));
        assert!(malformed(b"PROXY TCP4 ::1 ::2 1 2\r\n"));
        assert!(malformed(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n"));
        assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"));
        assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"));
        assert!(malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"));
        assert!(malformed(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(malformed(&v2));
        v2[12] = 0x22;
        assert!(malformed(&v2[..13]));
        v2[12] = 0x21;
        v2[15] = 4;
        v2.extend_from_slice(&[0; 4]);
        assert!(malformed(&v2));
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut v1 = b"PROXY TCP4 ".to_vec();
        v1.resize(V1_MAX_LEN, b'1');
        assert_eq!(parse(&v1), Err(ParseError::Oversized));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0x02, 0x09]); // 521 bytes of body
        assert_eq!(parse(&v2), Err(ParseError::Oversized));
        v2[15] = 0x08; // 520: the longest accepted
        assert_eq!(parse(&v2), Err(ParseError::Incomplete));
    }
}
