//! Helpers for the hook, signal and config-file tests: a private temp
//! directory per test, hook scripts written into it, files the scripts leave
//! behind, and `/proc` checks for processes and zombies.
//!
//! Used next to `common` (the proxy under test and the upstream stand-ins);
//! everything here is about the processes and files around the proxy.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::wait_until;

/// A directory of its own for one test, under the system temp dir, named
/// after the test, the pid and a counter; removed (recursively) on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("tcplock-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes an executable `/bin/sh` script `name` into the directory and
    /// returns the command that runs it (its quoted path). The script starts
    /// with `set -eu` and `D=<this directory>`, so `body` can leave files in
    /// `"$D"`.
    pub fn script(&self, name: &str, body: &str) -> String {
        let path = self.join(name);
        let text = format!(
            "#!/bin/sh\nset -eu\nD={}\n{body}\n",
            sh_quote(&self.path.to_string_lossy())
        );
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod script");
        sh_quote(&path.to_string_lossy())
    }

    /// Writes `text` to `name` atomically (temp file + rename), so a proxy
    /// re-reading it on SIGHUP never sees half a file.
    pub fn write_atomic(&self, name: &str, text: &str) -> PathBuf {
        let path = self.join(name);
        let tmp = self.join(&format!(".{name}.tmp"));
        fs::write(&tmp, text).expect("write temp file");
        fs::rename(&tmp, &path).expect("rename into place");
        path
    }

    /// The file's contents, or "" if it does not exist (yet).
    pub fn read(&self, name: &str) -> String {
        fs::read_to_string(self.join(name)).unwrap_or_default()
    }

    /// The file's non-empty lines.
    pub fn lines(&self, name: &str) -> Vec<String> {
        self.read(name)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn exists(&self, name: &str) -> bool {
        self.join(name).exists()
    }

    /// Waits up to `timeout` for `name` to exist.
    pub fn wait_for_file(&self, name: &str, timeout: Duration) -> bool {
        let path = self.join(name);
        wait_until(timeout, || path.exists())
    }

    /// Waits for `name` to exist, panicking with `what` otherwise.
    pub fn expect_file(&self, name: &str, what: &str) {
        assert!(
            self.wait_for_file(name, crate::common::WAIT),
            "{what}: {} did not appear within {:?}",
            self.join(name).display(),
            crate::common::WAIT
        );
    }

    /// A `KEY=value` file (as `env` prints it) as a map; waits for it first.
    pub fn env_file(&self, name: &str) -> BTreeMap<String, String> {
        self.expect_file(name, "hook environment dump");
        self.read(name)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A shell snippet that dumps every `TCPLOCK_*` variable into `"$D/FILE"`
/// atomically (`FILE` may use shell expansions such as `$TCPLOCK_CONN_ID`).
pub fn dump_env_to(file: &str) -> String {
    format!("env | grep '^TCPLOCK_' | sort > \"$D/.env.$$\"\nmv \"$D/.env.$$\" \"$D/{file}\"\n")
}

/// Single-quotes `s` for `/bin/sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `(state, ppid)` of a process from `/proc/PID/stat`, `None` if it is gone.
pub fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; parse after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether a process no longer runs: gone from `/proc`, or a zombie / dead
/// entry waiting for its (new) parent to reap it. A hook's orphaned
/// background child is reparented to init, whose reaping is not ours to test.
pub fn not_running(pid: u32) -> bool {
    match proc_state(pid) {
        None => true,
        Some((state, _)) => matches!(state, 'Z' | 'X' | 'x'),
    }
}

/// Pids of zombie processes whose parent is `ppid`.
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_state(pid).is_some_and(|(s, p)| s == 'Z' && p == ppid))
        .collect()
}

/// Children (any state) of `ppid`.
pub fn children(ppid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_state(pid).is_some_and(|(_, p)| p == ppid))
        .collect()
}

/// Asserts that `ppid` has no zombie children left, allowing `settle` for
/// a hook that is exiting right now to be reaped.
pub fn assert_no_zombies(ppid: u32, settle: Duration) {
    let mut last = Vec::new();
    let clean = wait_until(settle, || {
        last = zombie_children(ppid);
        last.is_empty()
    });
    assert!(clean, "zombie children of tcplock (pid {ppid}): {last:?}");
}
