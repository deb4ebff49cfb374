//! Arbitrary bytes to the PROXY protocol parser, as a balancer (or anyone)
//! in front of `--accept-proxy` could send them. Beyond "no panic": a header
//! read is never longer than the input or the cap, reads the same on its
//! own (nothing after it mattered), and every shorter prefix of it asks for
//! more bytes (so a header arriving in pieces is read the same); the
//! addresses it carries encode to a header that parses back to them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tcplock::internals::proxy_protocol::{MAX_HEADER_LEN, ParseError, Version, encode, parse};

fuzz_target!(|data: &[u8]| {
    let result = parse(data);
    let _ = result.map_err(|e| e.to_string());
    let Ok(parsed) = result else {
        return;
    };
    assert!(parsed.len <= data.len() && parsed.len <= MAX_HEADER_LEN);
    let header = &data[..parsed.len];
    assert_eq!(parse(header), Ok(parsed));
    for end in 0..parsed.len {
        assert_eq!(
            parse(&header[..end]),
            Err(ParseError::Incomplete),
            "prefix {end}"
        );
    }
    for version in [Version::V1, Version::V2] {
        let encoded = encode(version, parsed.addresses);
        let again = parse(encoded.as_bytes()).expect("an encoded header parses");
        assert_eq!(again.len, encoded.as_bytes().len());
        assert_eq!(again.addresses, parsed.addresses);
    }
});
