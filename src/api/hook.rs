//! Hooks: what runs before a connection is let through and after one overstays
//! its TTL. A hook is a shell command or a Rust closure; the core schedules both
//! alike and never looks inside.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Sender;

use crate::core::{ConnId, EndedBy, HookContext, HookExit, HookId, Outcome};
use crate::shell::Control;

/// A hook: a shell command or a closure. Cheap to clone.
///
/// ```
/// let restart = tcplock::Hook::command("systemctl restart converter");
/// assert_eq!(restart.as_command(), Some("systemctl restart converter"));
/// ```
#[derive(Clone)]
pub struct Hook(Arc<HookBody>);

pub(crate) enum HookBody {
    /// Run with `/bin/sh -c`; exit 0 is success.
    Command(String),
    /// Called on the loop thread with a ticket to answer, now or later.
    Activate(Box<dyn Fn(Ticket) + Send + Sync>),
    /// Called on the loop thread; done when it returns.
    Timeout(Box<dyn Fn(&TimeoutInfo) + Send + Sync>),
}

impl Hook {
    /// A shell command, run as `/bin/sh -c COMMAND` in a process group of its
    /// own, with the facts of the moment in `TCPLOCK_*` environment variables.
    pub fn command(command: impl Into<String>) -> Hook {
        Hook(Arc::new(HookBody::Command(command.into())))
    }

    /// A closure that decides whether a connection may go through. It runs on
    /// the loop thread, so it must return quickly; it may move the [`Ticket`]
    /// to another thread and answer from there.
    pub fn activate_fn(f: impl Fn(Ticket) + Send + Sync + 'static) -> Hook {
        Hook(Arc::new(HookBody::Activate(Box::new(f))))
    }

    /// A closure told about a TTL expiry. It runs on the loop thread and the
    /// hook counts as finished when it returns.
    pub fn timeout_fn(f: impl Fn(&TimeoutInfo) + Send + Sync + 'static) -> Hook {
        Hook(Arc::new(HookBody::Timeout(Box::new(f))))
    }

    /// The shell command, if this hook is one.
    pub fn as_command(&self) -> Option<&str> {
        match &*self.0 {
            HookBody::Command(command) => Some(command),
            HookBody::Activate(_) | HookBody::Timeout(_) => None,
        }
    }

    pub(crate) fn body(&self) -> &HookBody {
        &self.0
    }
}

/// Commands are equal when their text is; closures only to themselves. A reload
/// that swaps the hook is told apart from one that keeps it.
impl PartialEq for Hook {
    fn eq(&self, other: &Hook) -> bool {
        match (&*self.0, &*other.0) {
            (HookBody::Command(a), HookBody::Command(b)) => a == b,
            _ => Arc::ptr_eq(&self.0, &other.0),
        }
    }
}

impl Eq for Hook {}

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            HookBody::Command(command) => f.debug_tuple("Command").field(command).finish(),
            HookBody::Activate(_) => f.write_str("ActivateFn"),
            HookBody::Timeout(_) => f.write_str("TimeoutFn"),
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            HookBody::Command(command) => f.write_str(command),
            HookBody::Activate(_) | HookBody::Timeout(_) => f.write_str("<closure>"),
        }
    }
}

/// The permission slip of one closure on-activate hook run: answer it with
/// [`Ticket::proceed`] to let the connection through or [`Ticket::fail`] to
/// retry after a backoff. Dropping it unanswered counts as a failure, so a
/// panicking worker thread cannot wedge the queue. It is `Send`: answer from
/// any thread; the answer wakes the loop.
pub struct Ticket {
    hook: HookId,
    context: HookContext,
    reply: Option<Reply>,
}

pub(crate) struct Reply {
    pub(crate) control: Sender<Control>,
    pub(crate) waker: Arc<mio::Waker>,
}

impl Ticket {
    pub(crate) fn new(hook: HookId, context: HookContext, reply: Reply) -> Ticket {
        Ticket {
            hook,
            context,
            reply: Some(reply),
        }
    }

    /// The connection waiting for this answer.
    pub fn conn_id(&self) -> ConnId {
        self.context.conn
    }

    /// The waiting client's address.
    pub fn client_addr(&self) -> SocketAddr {
        self.context.client
    }

    /// The number (1, 2, ... K in the configured order) of the upstream
    /// instance the connection is going to; 1 for a single upstream. A
    /// failed answer makes that instance back off and sends the client to
    /// the next free instance. Its address is `context().upstream`
    /// (`TCPLOCK_INSTANCE` and `TCPLOCK_UPSTREAM` to a command hook).
    pub fn instance(&self) -> u32 {
        self.context.instance.0
    }

    /// Connections let through to that instance before this one.
    pub fn activations(&self) -> u64 {
        self.context.activations
    }

    /// 1 on the first run for this client, 2, 3, ... on retries.
    pub fn attempt(&self) -> u32 {
        self.context.attempt
    }

    /// How the last connection that held a permit ended, if any did.
    pub fn last_outcome(&self) -> Option<Outcome> {
        self.context.last_outcome
    }

    /// Who ended the last connection that held a permit, if any did.
    pub fn last_ended_by(&self) -> Option<EndedBy> {
        self.context.last_ended_by
    }

    /// Everything a command hook would see in its environment.
    pub fn context(&self) -> &HookContext {
        &self.context
    }

    /// Let the connection through.
    pub fn proceed(mut self) {
        self.answer(HookExit::Success);
    }

    /// Keep the connection waiting and retry after the backoff.
    pub fn fail(mut self) {
        self.answer(HookExit::Declined);
    }

    fn answer(&mut self, exit: HookExit) {
        if let Some(reply) = self.reply.take() {
            // A loop that has stopped no longer needs the answer.
            if reply
                .control
                .send(Control::HookDone(self.hook, exit))
                .is_ok()
            {
                let _ = reply.waker.wake();
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.answer(HookExit::Dropped);
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("hook", &self.hook)
            .field("context", &self.context)
            .finish()
    }
}

/// What a closure on-timeout hook is told.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TimeoutInfo {
    /// The connection whose TTL expired.
    pub id: ConnId,
    /// That connection's client address.
    pub client: SocketAddr,
    /// TTL expiries so far, this one included.
    pub timeouts: u64,
}

impl TimeoutInfo {
    pub(crate) fn from_context(context: &HookContext) -> TimeoutInfo {
        TimeoutInfo {
            id: context.conn,
            client: context.client,
            timeouts: context.timeouts,
        }
    }
}
