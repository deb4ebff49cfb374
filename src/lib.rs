//! tcplock: a TCP proxy that puts a FIFO counting semaphore in front of one
//! upstream service.
//!
//! The crate is split as DESIGN.md lays out: [`core`] is the pure state machine
//! (events in, actions out, time as a parameter), [`shell`] the single-threaded
//! mio loop that performs its actions, and the rest are the parts both use.

pub mod buffer;
pub mod cli;
pub mod config;
pub mod core;
pub mod log;
pub mod shell;
mod sys;
pub mod timer;
pub mod units;
