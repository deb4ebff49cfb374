//! Helpers for the tests of the supervised upstream (`--spawn`): the
//! stand-in office (`tests/office_standin.py`), what it recorded, the
//! `WHO` question a client asks it through tcplock, and `/proc` checks of
//! a process session.
//!
//! Used next to `common` (the proxy under test, bounded waits).
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{Proxy, event, field, num_field, wait_until};

/// The stand-in office.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/office_standin.py");

/// Waits that include a service start (python's start-up on a loaded
/// machine) or a 5 s sampling period.
pub const START_WAIT: Duration = Duration::from_secs(30);

/// A fresh, empty directory under the system temp dir, unique per process,
/// test and call.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path =
        std::env::temp_dir().join(format!("tcplock-office-{tag}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&path);
    fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// One stand-in office's state directory: its events file, its lock and
/// its `fail` switch. Every generation tcplock starts with
/// [`Office::command`] shares it, which is what lets a second copy find the
/// first one running.
pub struct Office {
    dir: PathBuf,
}

impl Office {
    pub fn new(tag: &str) -> Office {
        Office {
            dir: scratch_dir(tag),
        }
    }

    /// An office whose state directory is `dir` (made if missing): one of
    /// several under a pool's directory, say.
    pub fn at(dir: PathBuf) -> Office {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Office { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `--spawn` command: the wrapper in the foreground (`exec`, so the
    /// spawned pid is the wrapper's), with `extra` options.
    pub fn command(&self, extra: &str) -> String {
        format!(
            "exec python3 {SCRIPT} --state {} {extra}",
            self.dir.display()
        )
    }

    /// Every recorded event line so far.
    pub fn events(&self) -> Vec<String> {
        match fs::read_to_string(self.dir.join("events")) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Event lines named `ev`.
    pub fn matching(&self, ev: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|l| field(l, "ev").as_deref() == Some(ev))
            .collect()
    }

    pub fn count(&self, ev: &str) -> usize {
        self.matching(ev).len()
    }

    /// Waits until `ev` was recorded at least `n` times.
    pub fn wait_for(&self, ev: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count(ev) >= n)
    }

    /// The first `ev` line of generation `generation`, if any.
    pub fn of_gen(&self, ev: &str, generation: u64) -> Option<String> {
        self.matching(ev)
            .into_iter()
            .find(|l| field(l, "gen") == Some(generation.to_string()))
    }

    /// The server process (soffice.bin) of generation `generation`.
    pub fn server_pid(&self, generation: u64) -> u32 {
        let line = self.of_gen("server_start", generation).unwrap_or_else(|| {
            panic!("no server of generation {generation}: {:#?}", self.events())
        });
        num_field(&line, "pid") as u32
    }

    /// The wrapper process (the spawned one) of generation `generation`.
    pub fn wrapper_pid(&self, generation: u64) -> u32 {
        let line = self.of_gen("wrapper_start", generation).unwrap_or_else(|| {
            panic!(
                "no wrapper of generation {generation}: {:#?}",
                self.events()
            )
        });
        num_field(&line, "pid") as u32
    }

    /// Makes every start from now on fail (the wrapper exits 1 at once), or
    /// stops that.
    pub fn set_failing(&self, failing: bool) {
        let path = self.dir.join("fail");
        if failing {
            fs::write(&path, "").unwrap();
        } else {
            let _ = fs::remove_file(&path);
        }
    }

    /// The proof that no generation was started beside a live one: no copy
    /// ever found another holding the office lock, and no server found its
    /// port taken.
    pub fn assert_never_two(&self) {
        let events = self.events();
        let clashes: Vec<&String> = events
            .iter()
            .filter(|l| matches!(field(l, "ev").as_deref(), Some("handoff" | "port_busy")))
            .collect();
        assert!(
            clashes.is_empty(),
            "a generation started beside a live one: {clashes:#?}\nall events: {events:#?}"
        );
    }
}

/// A test that failed half-way may leave a stand-in behind (tcplock killed
/// by the test harness takes only its direct child along): end every
/// process this office recorded that still runs it.
impl Drop for Office {
    fn drop(&mut self) {
        for line in self.events() {
            let Some(pid) = field(&line, "pid").and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if alive(pid) && String::from_utf8_lossy(&cmdline).contains("office_standin") {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Asks the office behind `client` who it is: `(generation, server pid)`.
pub fn who(client: &mut TcpStream) -> (u64, u32) {
    client.write_all(b"WHO\n").expect("write WHO");
    answer(client)
}

/// Reads the answer to a `WHO` sent earlier (byte by byte: nothing after
/// the line is consumed).
pub fn answer(client: &mut TcpStream) -> (u64, u32) {
    let line = answer_line(client);
    let generation = field(&line, "gen")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no gen= in the answer {line:?}"));
    let pid = field(&line, "pid")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pid= in the answer {line:?}"));
    (generation, pid)
}

/// Reads the line answering a `WHO` sent earlier, without its newline
/// (byte by byte: nothing after the line is consumed).
pub fn answer_line(client: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match client.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => panic!("end of stream before the WHO answer: {line:?}"),
            Err(e) => panic!("reading the WHO answer: {e} (got {line:?})"),
        }
    }
    String::from_utf8_lossy(&line).trim_end().to_string()
}

/// A client through `proxy` that asks who serves it, then ends cleanly.
pub fn served_by(proxy: &Proxy) -> u64 {
    let mut client = proxy.connect();
    let (generation, _) = who(&mut client);
    crate::common::finish(client);
    generation
}

/// Live (not zombie) processes whose session id is `sid`, from `/proc`.
pub fn session_members(sid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // pid (comm) state ppid pgrp session ...; comm may hold spaces.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z") && fields.get(3) == Some(&sid.to_string().as_str())
        })
        .collect()
}

/// Whether `pid` is alive (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .map(|i| stat[i + 1..].split_whitespace().next() != Some("Z"))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// `(gen, pid)` of every `upstream_starting` line, in order.
pub fn starts(proxy: &Proxy) -> Vec<(u64, u32)> {
    proxy
        .matching(event("upstream_starting"))
        .iter()
        .map(|l| (num_field(l, "gen"), num_field(l, "pid") as u32))
        .collect()
}

/// `reason=` of every line of `ev`, in order.
pub fn reasons(proxy: &Proxy, ev: &'static str) -> Vec<String> {
    proxy
        .matching(event(ev))
        .iter()
        .map(|l| field(l, "reason").unwrap_or_default())
        .collect()
}

/// Waits until generation `generation` is ready; returns its line.
pub fn ready(proxy: &Proxy, generation: u64) -> String {
    let is_it = move |l: &str| {
        crate::common::is_event(l, "upstream_ready")
            && field(l, "gen") == Some(generation.to_string())
    };
    proxy
        .wait_for_log(is_it, START_WAIT)
        .unwrap_or_else(|| panic!("generation {generation} not ready within {START_WAIT:?}"))
}

/// `tcplock` arguments for a stand-in office listening on `port`, spawned
/// with `extra` options, followed by `more`.
pub fn office_args(office: &Office, port: u16, extra: &str, more: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-u".to_string(),
        format!("127.0.0.1:{port}"),
        "--spawn".to_string(),
        office.command(extra),
    ];
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

/// Starts tcplock in front of a stand-in office.
pub fn start_proxy(office: &Office, port: u16, extra: &str, more: &[&str]) -> Proxy {
    let args = office_args(office, port, extra, more);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proxy::start(&args)
}
