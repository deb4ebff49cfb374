//! `tcplock --check`: everything a start does short of binding, then the
//! settings in force printed as a config file.

use std::net::ToSocketAddrs;

use crate::api::error::Error;
use crate::config::{self, RawArgs, show};
use crate::shell::{check_control_path, resolve, resolve_metrics_addr, resolve_upstreams};

/// Loads and validates the settings `raw` names (the command line over its
/// `-c` file), looks the listen address and the upstream up (blocking: no
/// loop runs), and returns the effective settings in config-file syntax.
/// Nothing is bound. The error is the one a start would fail with.
pub fn check(raw: &RawArgs) -> Result<String, Error> {
    let config = config::load(raw)?;
    if !config.listen.is_empty() {
        resolve(
            "listen address",
            &config.listen,
            config.listen.to_socket_addrs(),
        )?;
    }
    let upstream = resolve_upstreams(&config)?;
    if let Some(addr) = &config.metrics {
        resolve_metrics_addr(addr)?;
    }
    if let Some(path) = &config.control {
        check_control_path(path)?;
    }
    Ok(show::render(&config, &upstream))
}
