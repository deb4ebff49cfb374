//! The one error type of the public API.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;

/// Why a [`crate::Lock`] could not be built or stopped running.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or out of range; the message names it.
    Invalid(String),
    /// The command line or the config file is wrong.
    Config(ConfigError),
    /// A host name did not resolve.
    Resolve {
        /// `"listen address"` or `"upstream"`.
        what: &'static str,
        /// The name as given, `HOST:PORT`.
        name: String,
        /// The resolver's error, or `NotFound` when it gave no address.
        source: io::Error,
    },
    /// The listening socket could not be bound.
    Bind {
        /// The resolved listen address.
        addr: SocketAddr,
        /// The OS error, e.g. address in use or permission denied.
        source: io::Error,
    },
    /// Setting up or running the event loop failed.
    Io {
        /// What was being done, as a short phrase for the message.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// The process exit code the `tcplock` binary uses: 2 for a usage error,
    /// 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(e) if e.exit_code() == 2 => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid(message) => f.write_str(message),
            Error::Config(e) => e.fmt(f),
            Error::Resolve { what, name, source } => {
                write!(f, "cannot resolve {what} '{name}': {source}")
            }
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Invalid(_) => None,
            Error::Config(e) => Some(e),
            Error::Resolve { source, .. }
            | Error::Bind { source, .. }
            | Error::Io { source, .. } => Some(source),
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Error {
        Error::Config(e)
    }
}
