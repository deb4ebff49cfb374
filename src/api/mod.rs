//! What a library user holds: the lock and its builder and handle, hooks and
//! their tickets, and the error type.

pub mod check;
pub mod ctl;
pub mod error;
pub mod hook;
pub mod lock;
