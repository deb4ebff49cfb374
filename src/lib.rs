#![warn(missing_docs)]
//! tcplock: a TCP proxy that puts a FIFO counting semaphore in front of one
//! upstream service, with hooks that run before a connection is let through and
//! after one overstays its TTL.
//!
//! Embed it with [`Lock::builder`]; the `tcplock` binary is a thin user of the
//! same API. The crate is split as DESIGN.md lays out: [`core`] is the pure
//! state machine (events in, actions out, time as a parameter), `shell` the
//! single-threaded mio loop that performs its actions, and the rest are the
//! parts both use.

pub mod buffer;
pub mod cli;
pub mod config;
pub mod core;
mod error;
mod hook;
mod lock;
pub mod log;
mod shell;
mod sys;
pub mod timer;
pub mod units;

pub use config::{Config, LogLevel, QueuedEof, Splice};
pub use core::{ConnId, HookContext, HookKind, Outcome, OutcomeCounts, Stats};
pub use error::Error;
pub use hook::{Hook, Ticket, TimeoutInfo};
pub use lock::{Builder, Handle, Lock};
