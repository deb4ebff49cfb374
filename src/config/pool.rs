//! Addressing a pool of upstream instances: `-u HOST:PORT[,HOST:PORT...]`,
//! `-u HOST:FIRST-LAST`, and `-p PORT`, `-p FIRST-LAST` or `-p P,P...` for
//! the 2011 flags. The config file's `upstream =` and `proxy-port =` read the
//! same text. Instances are numbered 1..K in the order given.
//!
//! A single `HOST:PORT` (or `PORT`) is read exactly as before pools existed,
//! errors included; only a value with a comma or a `FIRST-LAST` port is read
//! as a list or a range.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::config::show::Show;
use crate::config::units::{self, HostPort, Quoted};

/// Most instances one tcplock addresses: each holds at least a permit's
/// descriptors and a service state, and 1,024 is more than a host runs.
pub const MAX_INSTANCES: usize = 1024;

/// Reads `HOST:PORT`, `HOST:PORT,HOST:PORT...` or `HOST:FIRST-LAST` (IPv6
/// literals in brackets) into the instances, in order. The error is the
/// reason only, quoting the value; the caller names the flag or the line.
pub(crate) fn parse_upstreams(text: &str) -> Result<Vec<HostPort>, String> {
    if text.contains(',') {
        let mut upstreams = Vec::new();
        for item in list_items(text)? {
            let port = item.rfind(':').map(|at| &item[at + 1..]);
            if port.and_then(port_range).is_some() {
                return Err(mixes_a_range(text, item));
            }
            let upstream = units::parse_host_port(item)
                .map_err(|e| format!("{e} (in the list {})", Quoted(text)))?;
            upstreams.push(upstream);
        }
        check_list(text, upstreams.len())?;
        return match repeated(&upstreams) {
            Some(twice) => Err(named_twice(text, &twice.to_string())),
            None => Ok(upstreams),
        };
    }
    match upstream_range(text)? {
        Some(upstreams) => Ok(upstreams),
        None => units::parse_host_port(text)
            .map(|upstream| vec![upstream])
            .map_err(|e| e.to_string()),
    }
}

/// Reads `-p`/`proxy-port`: `PORT`, `FIRST-LAST` or `PORT,PORT...`, each
/// 1-65535, into the ports in order.
pub(crate) fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    if text.contains(',') {
        let mut ports = Vec::new();
        for item in list_items(text)? {
            if port_range(item).is_some() {
                return Err(mixes_a_range(text, item));
            }
            let port = units::parse_port(item)
                .map_err(|e| format!("{e} (in the list {})", Quoted(text)))?;
            if ports.contains(&port) {
                return Err(named_twice(text, item));
            }
            ports.push(port);
        }
        check_list(text, ports.len())?;
        return Ok(ports);
    }
    match port_range(text) {
        Some((first, last)) => {
            let (first, last) = check_range(text, first, last)?;
            Ok((first..=last).collect())
        }
        None => units::parse_port(text)
            .map(|port| vec![port])
            .map_err(|e| e.to_string()),
    }
}

/// The checks a list gets whichever way it came in (flags, file, builder,
/// reload): at least one instance, at most [`MAX_INSTANCES`], no port 0,
/// no address twice.
pub(crate) fn check_upstreams(upstreams: &[HostPort]) -> Result<(), String> {
    if upstreams.is_empty() {
        return Err("no upstream instance given".into());
    }
    if upstreams.len() > MAX_INSTANCES {
        return Err(format!(
            "{} instances are too many (at most {MAX_INSTANCES})",
            upstreams.len()
        ));
    }
    if let Some(zero) = upstreams.iter().find(|upstream| upstream.port == 0) {
        return Err(format!(
            "invalid address {}: port must be 1-65535",
            Quoted(&zero.to_string())
        ));
    }
    match repeated(upstreams) {
        Some(twice) => Err(format!(
            "the instance {} is listed twice",
            Quoted(&twice.to_string())
        )),
        None => Ok(()),
    }
}

/// Consecutive ports of one host print as a range (`host:8100-8103`),
/// anything else as a list (`a:1,b:2`); either reads back as the same
/// instances in the same order.
impl Show for Vec<HostPort> {
    fn show(&self) -> String {
        let consecutive = self.len() > 1
            && self.windows(2).all(|pair| {
                pair[0].host == pair[1].host && pair[0].port.checked_add(1) == Some(pair[1].port)
            });
        match (consecutive, self.first(), self.last()) {
            (true, Some(first), Some(last)) => format!("{first}-{}", last.port),
            _ => list_text(self),
        }
    }
}

/// The instances as a comma-separated list (`a:1,b:2`), never a range.
pub(crate) fn list_text(upstreams: &[HostPort]) -> String {
    let items: Vec<String> = upstreams.iter().map(HostPort::to_string).collect();
    items.join(",")
}

/// The items of a comma-separated list, blanks around each trimmed; an
/// empty item is refused.
fn list_items(text: &str) -> Result<Vec<&str>, String> {
    let items: Vec<&str> = text.split(',').map(str::trim).collect();
    if items.iter().any(|item| item.is_empty()) {
        return Err(format!("the list {} has an empty element", Quoted(text)));
    }
    Ok(items)
}

/// A list longer than [`MAX_INSTANCES`] is refused, quoting its start.
fn check_list(text: &str, count: usize) -> Result<(), String> {
    if count <= MAX_INSTANCES {
        return Ok(());
    }
    let start: Vec<&str> = text.split(',').take(3).collect();
    Err(format!(
        "the list {} has {count} instances (at most {MAX_INSTANCES})",
        Quoted(&format!("{},...", start.join(",")))
    ))
}

fn mixes_a_range(text: &str, range: &str) -> String {
    format!(
        "the list {} mixes in the range {} (give a list or one range)",
        Quoted(text),
        Quoted(range)
    )
}

fn named_twice(text: &str, item: &str) -> String {
    format!("the list {} names {} twice", Quoted(text), Quoted(item))
}

/// `HOST:FIRST-LAST` as its instances, `None` when the port
/// is not two runs of digits around a dash (then it is read as one
/// address, with the errors a single address always had).
fn upstream_range(text: &str) -> Result<Option<Vec<HostPort>>, String> {
    let Some(at) = text.rfind(':') else {
        return Ok(None);
    };
    let Some((first, last)) = port_range(&text[at + 1..]) else {
        return Ok(None);
    };
    // The host is read (and refused) as a single address's would be.
    let host = match units::parse_host_port(&format!("{}:1", &text[..at])) {
        Ok(upstream) => upstream.host,
        Err(units::UnitError::InvalidAddress { reason, .. }) => {
            let value = text.to_owned();
            return Err(units::UnitError::InvalidAddress { value, reason }.to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    let (first, last) = check_range(text, first, last)?;
    let upstream = |port| HostPort {
        host: host.clone(),
        port,
    };
    Ok(Some((first..=last).map(upstream).collect()))
}

/// `FIRST-LAST`, both plain digits, unchecked.
fn port_range(text: &str) -> Option<(&str, &str)> {
    let (first, last) = text.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(first) && digits(last)).then_some((first, last))
}

/// Both ends 1-65535, in order, at most [`MAX_INSTANCES`] ports.
fn check_range(text: &str, first: &str, last: &str) -> Result<(u16, u16), String> {
    let (Ok(first), Ok(last)) = (units::parse_port(first), units::parse_port(last)) else {
        return Err(format!(
            "invalid port range {}: ports must be 1-65535",
            Quoted(text)
        ));
    };
    if first > last {
        return Err(format!(
            "invalid port range {}: {first} is above {last}",
            Quoted(text)
        ));
    }
    let count = usize::from(last - first) + 1;
    if count > MAX_INSTANCES {
        return Err(format!(
            "the range {} makes {count} instances (at most {MAX_INSTANCES})",
            Quoted(text)
        ));
    }
    Ok((first, last))
}

/// The first instance whose address an earlier one already has. Names
/// compare without case, IP literals by address (`::1` is `0::1`).
fn repeated(upstreams: &[HostPort]) -> Option<&HostPort> {
    let mut seen = HashSet::new();
    upstreams.iter().find(|upstream| {
        let host = match upstream.host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => upstream.host.to_ascii_lowercase(),
        };
        !seen.insert((host, upstream.port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn one_address_is_one_instance() {
        assert_eq!(parse_upstreams("db:5432"), Ok(vec![hp("db", 5432)]));
        assert_eq!(parse_upstreams("[::1]:5"), Ok(vec![hp("::1", 5)]));
        assert_eq!(parse_upstreams("a-b.c:9"), Ok(vec![hp("a-b.c", 9)]));
        assert_eq!(parse_ports("8100"), Ok(vec![8100]));
    }

    #[test]
    fn a_list_is_one_instance_per_address_in_order() {
        assert_eq!(
            parse_upstreams("w2:2002,w1:2002, [::1]:5 ,[::1]:6"),
            Ok(vec![
                hp("w2", 2002),
                hp("w1", 2002),
                hp("::1", 5),
                hp("::1", 6)
            ])
        );
        assert_eq!(parse_ports("3,1,2"), Ok(vec![3, 1, 2]));
    }

    #[test]
    fn a_range_is_one_instance_per_port() {
        assert_eq!(
            parse_upstreams("localhost:8100-8103"),
            Ok((8100..=8103).map(|p| hp("localhost", p)).collect())
        );
        assert_eq!(
            parse_upstreams("[::1]:5-8"),
            Ok((5..=8).map(|p| hp("::1", p)).collect())
        );
        assert_eq!(parse_upstreams("h:7-7"), Ok(vec![hp("h", 7)]));
        assert_eq!(parse_ports("8100-8101"), Ok(vec![8100, 8101]));
        assert_eq!(parse_ports("1-1024").map(|p| p.len()), Ok(1024));
        assert_eq!(parse_upstreams("h:64512-65535").map(|u| u.len()), Ok(1024));
    }

    #[test]
    fn bad_ranges_are_refused_quoting_them() {
        let cases = [
            (
                "a:8103-8100",
                "invalid port range 'a:8103-8100': 8103 is above 8100",
            ),
            ("a:0-5", "invalid port range 'a:0-5': ports must be 1-65535"),
            (
                "a:65535-65536",
                "invalid port range 'a:65535-65536': ports must be 1-65535",
            ),
            (
                "a:1-1025",
                "the range 'a:1-1025' makes 1025 instances (at most 1024)",
            ),
            (
                "a b:1-2",
                "invalid address 'a b:1-2': host may hold only letters, digits, '-', '.' and '_'",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(parse_upstreams(text), Err(message.to_string()), "{text}");
        }
        assert_eq!(
            parse_ports("8103-8100"),
            Err("invalid port range '8103-8100': 8103 is above 8100".into())
        );
        assert_eq!(
            parse_ports("1-2000"),
            Err("the range '1-2000' makes 2000 instances (at most 1024)".into())
        );
    }

    #[test]
    fn bad_lists_are_refused_quoting_them() {
        let cases = [
            (
                "a:1,b:2-5",
                "the list 'a:1,b:2-5' mixes in the range 'b:2-5' (give a list or one range)",
            ),
            ("a:1,,b:2", "the list 'a:1,,b:2' has an empty element"),
            ("a:1,", "the list 'a:1,' has an empty element"),
            ("a:1,b:2,A:1", "the list 'a:1,b:2,A:1' names 'A:1' twice"),
            (
                "[::1]:5,[0::1]:5",
                "the list '[::1]:5,[0::1]:5' names '[0::1]:5' twice",
            ),
            (
                "a:1,b:0",
                "invalid address 'b:0': port must be 1-65535 (in the list 'a:1,b:0')",
            ),
            (
                "a:1,b:65536",
                "invalid address 'b:65536': port must be 1-65535 (in the list 'a:1,b:65536')",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(parse_upstreams(text), Err(message.to_string()), "{text}");
        }
        assert_eq!(
            parse_ports("1,2-3"),
            Err("the list '1,2-3' mixes in the range '2-3' (give a list or one range)".into())
        );
        assert_eq!(
            parse_ports("1,1"),
            Err("the list '1,1' names '1' twice".into())
        );
        assert_eq!(
            parse_ports("1,0"),
            Err("invalid port '0' (use 1-65535) (in the list '1,0')".into())
        );
    }

    #[test]
    fn more_than_1024_listed_is_refused() {
        let list: Vec<String> = (1..=1025).map(|p| format!("h:{p}")).collect();
        assert_eq!(
            parse_upstreams(&list.join(",")),
            Err("the list 'h:1,h:2,h:3,...' has 1025 instances (at most 1024)".into())
        );
        assert_eq!(
            parse_upstreams(&list[..1024].join(",")).map(|u| u.len()),
            Ok(1024)
        );
        let ports: Vec<String> = (1..=1025).map(|p| p.to_string()).collect();
        assert!(parse_ports(&ports.join(",")).is_err());
    }

    #[test]
    fn single_address_errors_are_as_before() {
        for bad in ["a:0", "a:5-", "a:-5", "a", "a:x-y", "::1:5", "a:1--2"] {
            assert_eq!(
                parse_upstreams(bad),
                Err(units::parse_host_port(bad).unwrap_err().to_string()),
                "{bad}"
            );
        }
        for bad in ["0", "x", "65536", "5-", ""] {
            assert_eq!(
                parse_ports(bad),
                Err(units::parse_port(bad).unwrap_err().to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_check_refuses_what_parsing_refuses() {
        assert!(check_upstreams(&[hp("a", 1), hp("b", 1)]).is_ok());
        assert_eq!(
            check_upstreams(&[]),
            Err("no upstream instance given".into())
        );
        assert_eq!(
            check_upstreams(&[hp("a", 1), hp("a", 1)]),
            Err("the instance 'a:1' is listed twice".into())
        );
        assert_eq!(
            check_upstreams(&[hp("a", 0)]),
            Err("invalid address 'a:0': port must be 1-65535".into())
        );
        let many: Vec<HostPort> = (1..=1025).map(|p| hp("h", p)).collect();
        assert_eq!(
            check_upstreams(&many),
            Err("1025 instances are too many (at most 1024)".into())
        );
    }

    #[test]
    fn consecutive_ports_show_as_a_range_the_rest_as_a_list() {
        let cases = [
            ("a:1", "a:1"),
            ("a:1-3", "a:1-3"),
            ("[::1]:5-8", "[::1]:5-8"),
            ("[::1]:5,[::1]:7", "[::1]:5,[::1]:7"),
            ("a:2,a:1", "a:2,a:1"),
            ("a:1,b:2", "a:1,b:2"),
            ("a:1,a:2", "a:1-2"),
            ("h:65534-65535", "h:65534-65535"),
        ];
        for (text, shown) in cases {
            let upstreams = parse_upstreams(text).unwrap();
            assert_eq!(upstreams.show(), shown);
            assert_eq!(parse_upstreams(shown), Ok(upstreams), "{text}");
        }
    }
}
