#![warn(missing_docs)]
//! tcplock: a TCP proxy that puts a FIFO counting semaphore in front of one
//! upstream service, with hooks that run before a connection is let through and
//! after one overstays its TTL.
//!
//! Embed it with [`Lock::builder`]; the `tcplock` binary is a thin user of the
//! same API. The crate is split as DESIGN.md lays out: `core` is the pure
//! state machine (events in, actions out, time as a parameter), `shell` the
//! single-threaded mio loop that performs its actions, `config` the settings
//! table and its two sources, and `api` the types a user holds.

mod api;
mod config;
mod core;
mod proxy_protocol;
mod shell;
mod sys;

pub use api::error::Error;
pub use api::hook::{Hook, Ticket, TimeoutInfo};
pub use api::lock::{Builder, Handle, Lock};
pub use config::units::HostPort;
pub use config::{Config, ConfigError, LogLevel, QueuedEof, SendProxy, ShutdownQueue, Splice};
pub use core::{
    ConnId, EndedBy, Generation, HookContext, HookKind, Outcome, OutcomeCounts, RestartOn,
    RestartReason, ServiceStateName, ServiceStats, Stats,
};

/// What the `tcplock` binary, the fuzz targets and the benchmarks reach
/// beyond the library's API. Not part of the API: it may change at any time.
#[doc(hidden)]
pub mod internals {
    pub use crate::api::check::check;
    pub use crate::api::ctl;
    pub use crate::config::{cli, file, load, units};
    /// Whether a service manager passed this process its listening socket.
    pub use crate::shell::socket_activated;
    /// The PROXY protocol parser, for its fuzz target.
    pub mod proxy_protocol {
        pub use crate::proxy_protocol::*;
    }
    /// The pure state machine, for the model checker's fuzz target and
    /// `examples/simulate.rs`.
    #[cfg(feature = "model")]
    pub mod core {
        pub use crate::core::model;
        pub use crate::core::{
            Action, ConnRef, Core, EndedBy, Event, HookExit, HookRef, InstanceId, ProxyHeader,
            RelayCause, RelayEnd, RestartOn, ServiceExit, ServiceRef, ServiceSample,
            ServiceSettings, Settings, StopSignal,
        };
    }
}
