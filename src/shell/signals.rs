//! Signals, messages from other threads, and reloading the settings.

use super::*;
use crate::config::show::Show;

impl Shell {
    pub(super) fn handle_signals(&mut self, now: u64) {
        // Drain the self-pipe first, then act: signals coalesce, and one
        // SIGCHLD may stand for several exits.
        let Some(signals) = &mut self.signals else {
            return;
        };
        let pending: Vec<i32> = signals.pending().collect();
        for signal in pending {
            match signal {
                SIGCHLD => {
                    self.reap(now);
                    self.services_exited(now);
                    self.reap_orphans(now);
                    self.reap_service_orphans();
                }
                // A reload during shutdown would tell systemd READY=1 after
                // STOPPING=1: said and ignored.
                SIGHUP if self.core.is_stopping() => {
                    if let Some(line) = self.logger.line(LogLevel::Warn, "reload_skipped") {
                        line.field("reason", "stopping");
                    }
                }
                SIGHUP => self.reload(),
                SIGTERM | SIGINT => self.core.handle_shutdown(now),
                SIGUSR1 => self.core.handle_dump_state(now),
                _ => {}
            }
            self.drain(now);
        }
    }

    pub(super) fn handle_control(&mut self, now: u64) {
        while let Ok(control) = self.control_rx.try_recv() {
            match control {
                Control::Stop => self.core.handle_shutdown(now),
                Control::Reload(config, upstream_addrs) => {
                    self.apply_config(now, *config, upstream_addrs, ("source", "handle"));
                }
                Control::FileReloaded(loaded) => self.file_reloaded(now, loaded),
                Control::HookDone(hook, exit) => self.hook_ended(now, hook, exit),
            }
            self.drain(now);
        }
    }

    /// SIGHUP: re-reads the config file and looks the upstream up again
    /// (a host may have moved even if its name did not) on a helper thread,
    /// so a slow resolver never stalls the loop. The answer comes back as
    /// `Control::FileReloaded`.
    pub(super) fn reload(&mut self) {
        let (Some(path), Some(args)) = (
            self.config.config_file.as_ref(),
            self.options.reload_args.as_ref(),
        ) else {
            if let Some(line) = self.logger.line(LogLevel::Warn, "reload_skipped") {
                line.field("reason", "no config file given with -c");
            }
            return;
        };
        if self.reload_running {
            self.reload_again = true;
            return;
        }
        let args = args.clone();
        let control = self.control_tx.clone();
        let waker = Arc::clone(&self.waker);
        let spawned = std::thread::Builder::new()
            .name("tcplock-reload".to_string())
            .spawn(move || {
                let loaded = config::load(&args).map_err(Error::from).and_then(|new| {
                    let addrs = resolve_upstreams(&new)?;
                    Ok((Box::new(new), addrs))
                });
                // A loop that stopped meanwhile no longer wants the answer.
                if control.send(Control::FileReloaded(loaded)).is_ok() {
                    let _ = waker.wake();
                }
            });
        match spawned {
            Ok(_) => {
                self.reload_running = true;
                self.notify.reloading(&mut self.logger);
                self.reloads_started += 1;
            }
            Err(e) => {
                let source = path.display().to_string();
                let message = format!("cannot start the reload thread: {e}");
                if let Some(line) = self.logger.line(LogLevel::Error, "reload_failed") {
                    line.field("file", source).field("error", &message);
                }
                self.notify.reloaded(&mut self.logger);
                // No reload runs: those waiting for the next one hear so.
                self.control_fail_waiters(self.now(), true, &message);
            }
        }
    }

    pub(super) fn file_reloaded(
        &mut self,
        now: u64,
        loaded: Result<(Box<Config>, Vec<Vec<SocketAddr>>), Error>,
    ) {
        self.reload_running = false;
        let source = self
            .config
            .config_file
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        let answer = match loaded {
            Ok((new, addrs)) => Ok(self.apply_config(now, *new, addrs, ("file", &source))),
            Err(e) => {
                let message = e.to_string();
                if let Some(line) = self.logger.line(LogLevel::Error, "reload_failed") {
                    line.field("file", &source).field("error", e);
                }
                Err(message)
            }
        };
        self.control_reloaded(now, self.reloads_started, answer);
        if std::mem::take(&mut self.reload_again) {
            self.reload();
        } else {
            self.notify.reloaded(&mut self.logger);
        }
    }

    /// Puts new settings in force for activations from now on; the listening
    /// socket stays as it is.
    pub(super) fn apply_config(
        &mut self,
        now: u64,
        mut new: Config,
        resolved: Vec<Vec<SocketAddr>>,
        (origin_key, origin): (&str, &str),
    ) -> Vec<&'static str> {
        // Deadlines that passed fire under the settings (and hooks) they were
        // set under, before the hook table names the new hooks.
        self.core.handle_tick(now);
        self.drain(now);
        // Which file SIGHUP reads is fixed by the command line, whatever
        // config a `Handle::reload` passes.
        new.config_file = self.config.config_file.clone();
        for key in config::keep_fixed(&self.config, &mut new) {
            if let Some(line) = self.logger.line(LogLevel::Warn, "reload_ignored") {
                line.field("key", key)
                    .field("reason", "fixed at start-up; restart to change it");
            }
        }
        let changed = config::changed_keys(&self.config, &new);
        self.logger.set_level(new.log_level);
        self.pool.reconfigure(new.buffer_size, new.splice);
        let mut settings = core_settings(&new, &mut self.hooks, &mut self.service.table);
        settings.max_queue = self.fds.adjusted_max_queue(&new, &mut self.logger);
        self.core.handle_reload(now, settings);
        self.outputs_reloaded();
        // The core numbered the list anew: each number's addresses follow
        // its name.
        let names = new.upstreams.iter().map(ToString::to_string);
        self.upstreams
            .update(names.zip(resolved), &self.core.stats().instances);
        if let Some(line) = self.logger.line(LogLevel::Info, "reloaded") {
            line.field(origin_key, origin)
                .field("changed", CommaList(&changed))
                .field_opt(
                    "upstream",
                    changed.contains(&"upstream").then(|| new.upstreams.show()),
                )
                .field("addresses", self.upstreams.address_count());
        }
        self.config = new;
        self.supervise();
        changed
    }
}

/// Installs handlers for `signals` and registers their self-pipe.
pub(super) fn watch_signals(poll: &Poll, signals: &[i32]) -> io::Result<Signals> {
    let mut watched = Signals::new(signals.iter().copied())?;
    poll.registry()
        .register(&mut watched, SIGNALS, Interest::READABLE)?;
    Ok(watched)
}
