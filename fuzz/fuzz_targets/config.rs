//! Arbitrary bytes to every text parser of the configuration: the config file,
//! the command line (split on NUL), and the duration, size, port and address
//! parsers. Errors are fine; a panic (or a panicking `Display`) is a bug.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tcplock::internals::{cli, file, load, units};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let shown = |r: Result<String, String>| r.map_or_else(|e| e.len(), |v| v.len());

    let _ = shown(
        file::parse_file(&text, Path::new("fuzz.conf"))
            .map(|f| format!("{f:?}"))
            .map_err(|e| e.to_string()),
    );
    for s in [&*text, text.trim()] {
        let _ = shown(
            units::parse_duration(s)
                .map(|d| format!("{d:?}"))
                .map_err(|e| e.to_string()),
        );
        let _ = shown(
            units::parse_size(s)
                .map(|n| n.to_string())
                .map_err(|e| e.to_string()),
        );
        let _ = shown(units::parse_listen(s).map_err(|e| e.to_string()));
        let _ = shown(
            units::parse_host_port(s)
                .map(|h| format!("{h:?}"))
                .map_err(|e| e.to_string()),
        );
        let _ = shown(
            units::parse_port(s)
                .map(|p| p.to_string())
                .map_err(|e| e.to_string()),
        );
        let _ = shown(units::parse_host(s).map_err(|e| e.to_string()));
    }

    // The command line, then validation, unless it names a config file (which
    // would read whatever path the input spells).
    let args = text.split('\0').map(str::to_owned);
    match cli::parse_from(args) {
        Ok(cli::Command::Run(raw)) if raw.config.is_none() => {
            let _ = shown(
                load(&raw)
                    .map(|c| format!("{c:?}"))
                    .map_err(|e| e.to_string()),
            );
        }
        Ok(_) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
