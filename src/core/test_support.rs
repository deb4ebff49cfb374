//! Helpers the core's, the pool's and the supervisor's unit tests share.

use std::net::SocketAddr;

use super::{Action, Core, EndedBy, Event, RelayCause, RelayEnd};

/// A client address on 127.0.0.1.
pub(super) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Drains the core's actions: the others, and the log lines apart.
pub(super) fn drain(core: &mut Core) -> (Vec<Action>, Vec<Event>) {
    let mut actions = Vec::new();
    let mut events = Vec::new();
    while let Some(action) = core.poll_action() {
        match action {
            Action::Log(event) => events.push(event),
            other => actions.push(other),
        }
    }
    (actions, events)
}

/// A relay both peers finished, the client first.
pub(super) fn finished() -> RelayEnd {
    RelayEnd {
        cause: RelayCause::Finished,
        ended_by: EndedBy::Client,
    }
}
