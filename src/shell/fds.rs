//! How many descriptors tcplock may still open, and how many activating needs
//! kept free: accepting pauses before a client would take one of those.

use super::*;

/// Descriptors one permit needs beyond its client: the upstream socket and a
/// splice pipe (two descriptors) per direction.
const FDS_PER_PERMIT: usize = 5;

/// Descriptors spawning one hook process needs: the stdout duplicate,
/// /dev/null, the exec-status pipe std uses while spawning, and a pidfd.
const FDS_PER_HOOK: usize = 5;

/// Kept free for the listening and control sockets later features add.
const FDS_SPARE: usize = 4;

/// Kept free for each configured server (`--control`, `--metrics`): its
/// connections, plus the one an accept beyond them takes while it is told
/// so and closed. Their connections live in this part of the reserve and
/// are not counted against clients.
const FDS_PER_SERVER: usize = {
    assert!(control::MAX_CONTROL_CONNS == http::MAX_CONNS);
    http::MAX_CONNS + 1
};

/// The descriptors tcplock may use, and how many of them activating needs
/// kept free. Open descriptors are counted without a system call: those
/// open at start, plus one per client, plus idle pipes. What an activation
/// opens (upstream sockets, pipes in use, a hook) is in the reserve.
pub(super) struct FdBudget {
    /// The soft limit at start; `None` if it could not be read (then only
    /// EMFILE pauses accepting).
    limit: Option<usize>,
    /// Descriptors open once the loop was set up.
    baseline: usize,
}

/// Assumed open at start where /proc cannot tell: the standard streams, the
/// listener, the poll, the signal pipe and the waker, generously rounded.
const FDS_AT_START_UNKNOWN: usize = 16;

impl FdBudget {
    /// The budget under the soft limit `limit`, counting what is open now.
    pub(super) fn new(limit: Option<u64>) -> FdBudget {
        FdBudget {
            limit: limit.and_then(|limit| usize::try_from(limit).ok()),
            baseline: sys::count_open_fds().unwrap_or(FDS_AT_START_UNKNOWN),
        }
    }

    /// Descriptors open once the loop was set up, plus those opened for
    /// good since.
    pub(super) fn baseline(&self) -> usize {
        self.baseline
    }

    /// Descriptors opened for good after the count at start (a signal pipe).
    pub(super) fn opened_for_good(&mut self, count: usize) {
        self.baseline += count;
    }

    /// Descriptors opened for good and closed since (a removed instance's
    /// output pipes).
    pub(super) fn closed_for_good(&mut self, count: usize) {
        self.baseline = self.baseline.saturating_sub(count);
    }

    /// Whether one more client would eat into what activation needs, with
    /// `open` descriptors held beyond those counted at start.
    pub(super) fn at_reserve(&self, open: usize, config: &Config) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        self.baseline + open + 1 + self.reserve(config) > limit
    }

    /// Descriptors activating needs kept free under `config`: the permits
    /// that fit next to their clients, one hook if a command hook is
    /// configured, each server's connections, and a few spare.
    fn reserve(&self, config: &Config) -> usize {
        let is_command = |hook: &Option<Hook>| hook.as_ref().and_then(Hook::as_command).is_some();
        let hook = if is_command(&config.on_activate) || is_command(&config.on_timeout) {
            FDS_PER_HOOK
        } else {
            0
        };
        let servers = usize::from(config.control.is_some()) + usize::from(config.metrics.is_some());
        let fixed = hook + servers * FDS_PER_SERVER + FDS_SPARE;
        let room = self
            .limit
            .unwrap_or(usize::MAX)
            .saturating_sub(self.baseline + fixed);
        // More permits than the limit can hold would keep every client out.
        let permits = (config.permits as usize).min(room / (FDS_PER_PERMIT + 1));
        permits * FDS_PER_PERMIT + fixed
    }

    /// The most clients the limit holds beside the reserve, if it is known.
    fn client_capacity(&self, config: &Config) -> Option<usize> {
        let limit = self.limit?;
        Some(limit.saturating_sub(self.baseline + self.reserve(config)))
    }

    /// `--max-queue`, lowered (and said so) to the clients the limit can hold
    /// beside the reserve. Accepting pauses at that many clients, so a full
    /// queue makes clients wait in the kernel's backlog rather than be
    /// rejected for descriptors tcplock lacks.
    pub(super) fn adjusted_max_queue(&self, config: &Config, logger: &mut Logger) -> usize {
        let fits = self.client_capacity(config);
        match (fits, self.limit) {
            (Some(fits), Some(limit)) if fits < config.max_queue => {
                if let Some(line) = logger.line(LogLevel::Warn, "limit_adjusted") {
                    line.field("max_queue", fits).field("nofile", limit);
                }
                fits
            }
            _ => config.max_queue,
        }
    }
}
