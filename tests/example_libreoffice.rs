//! The LibreOffice example (`examples/libreoffice/`), run as shipped: its
//! `spawn` line, through `/bin/sh -c`, starts a `soffice` found on `PATH`.
//! First a fake one that becomes the stand-in office (`office_standin.py`),
//! so the example's quoting, its ports and its restart rules are pinned on
//! every machine; then, when LibreOffice and python3-uno are installed, the
//! real one with real UNO conversions (skipped with the reason otherwise).
mod common;
mod officekit;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use officekit::*;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/libreoffice")
        .join(name)
}

/// `KEY = value` lines of the example config (comments and blanks skipped).
fn example_config() -> BTreeMap<String, String> {
    let path = example("tcplock.conf");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A `soffice` for `PATH` that records its arguments and becomes the
/// stand-in office (on tcplock's upstream port, whatever `--accept` says).
fn fake_soffice(office: &Office) -> PathBuf {
    let bin = scratch_dir("fake-soffice");
    let script = bin.join("soffice");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             printf '%s\\n' \"$@\" > {dir}/soffice-args\n\
             exec python3 {SCRIPT} --state {dir}\n",
            dir = office.dir().display()
        ),
    )
    .expect("write the fake soffice");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

fn with_path(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn the_example_is_one_config_and_no_script() {
    let config = example_config();
    for key in [
        "spawn",
        "restart-after",
        "restart-rss",
        "timeout",
        "queued-eof",
    ] {
        assert!(config.contains_key(key), "the example sets no {key}");
    }
    assert_eq!(config["restart-rss"], "1g");
    assert_eq!(config["queued-eof"], "drop");
    for key in ["on-activate", "on-timeout"] {
        assert!(!config.contains_key(key), "the example still runs a hook");
    }
    assert!(!example("restart-office.sh").exists());
    // The README explains each key the config sets.
    let readme = std::fs::read_to_string(example("README.md")).expect("README");
    for key in config.keys() {
        assert!(
            readme.contains(key.as_str()),
            "README says nothing of {key}"
        );
    }
}

#[test]
fn the_example_config_runs_and_restarts_the_office_it_names() {
    let office = Office::new("example");
    let bin = fake_soffice(&office);
    let port = unused_port();
    let conf = example("tcplock.conf");
    let upstream = format!("127.0.0.1:{port}");
    let path = with_path(&bin);
    let state = office.dir().display().to_string();
    // The config as shipped; the command line moves the office's port and
    // shortens the restart rules.
    let proxy = Proxy::start_with_env(
        &[("PATH", &path), ("OFFICE_STANDIN_STATE", &state)],
        &[
            "-c",
            &conf.to_string_lossy(),
            "-u",
            &upstream,
            "--restart-after",
            "3",
            "-t",
            "1s",
        ],
    );
    let served: Vec<u64> = (0..4).map(|_| served_by(&proxy)).collect();
    assert_eq!(served, [1, 1, 1, 2]);

    // The spawn line reached soffice as the user meant it: the accept string
    // is one argument, ';' and all.
    let args = std::fs::read_to_string(office.dir().join("soffice-args")).expect("soffice ran");
    let args: Vec<&str> = args.lines().collect();
    for want in [
        "--headless",
        "--norestore",
        "-env:UserInstallation=file:///var/lib/tcplock/office-profile",
        "--accept=socket,host=127.0.0.1,port=2002;urp;",
    ] {
        assert!(args.contains(&want), "soffice got {args:?}, no {want:?}");
    }

    // A hung conversion is cut by the timeout and the office restarted.
    let mut hung = proxy.connect();
    assert_eq!(who(&mut hung).0, 2);
    expect_closed(&mut hung, WAIT).expect("the timeout cuts the hung client");
    let due = proxy.expect_log(
        |l: &str| is_event(l, "restart_due") && field(l, "gen").as_deref() == Some("2"),
        "gen 2 due after the timeout",
    );
    assert_eq!(field(&due, "reason").as_deref(), Some("timeout"), "{due}");
    assert_eq!(served_by(&proxy), 3);
    assert_eq!(
        reasons(&proxy, "upstream_starting"),
        ["first", "after_n", "timeout"]
    );

    let leaders: Vec<u32> = starts(&proxy).iter().map(|&(_, pid)| pid).collect();
    let mut proxy = proxy;
    let status = proxy.stop(START_WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    for leader in leaders {
        assert!(session_members(leader).is_empty(), "session {leader} left");
    }
    office.assert_never_two();
}

/// A python3 that can `import uno` (python3-uno installs for the system
/// python, which may not be the first `python3` on `PATH`).
fn python_with_uno() -> Option<String> {
    ["/usr/bin/python3", "python3"].into_iter().find_map(|py| {
        let ok = Command::new(py)
            .args(["-c", "import uno"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| py.to_string())
    })
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A failed test kills tcplock with SIGKILL, which takes only its direct
/// child along (the README says so): this kills every process still running
/// with the test's own office profile on its command line.
struct OfficeReaper(String);

impl Drop for OfficeReaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&self.0) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Summed VmRSS (KiB) of the live processes of session `sid`.
fn session_rss_kib(sid: u32) -> u64 {
    session_members(sid)
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// The example config in front of a real headless LibreOffice, with real
/// UNO conversions (text to PDF), restarted by count and by memory.
/// `TCPLOCK_LO_CONVERSIONS` (default 12), `TCPLOCK_LO_RESTART_AFTER`
/// (default 5) and `TCPLOCK_LO_RESTART_RSS_MIB` (default 1024) scale it; it
/// prints conversions, restarts by reason and the office's RSS per
/// generation.
#[test]
fn a_real_libreoffice_converts_through_tcplock() {
    if !on_path("soffice") {
        eprintln!(
            "skipped: no soffice on PATH (apt-get install libreoffice-writer-nogui python3-uno)"
        );
        return;
    }
    let Some(python) = python_with_uno() else {
        eprintln!("skipped: no python3 can import uno (apt-get install python3-uno)");
        return;
    };
    let conversions = env_number("TCPLOCK_LO_CONVERSIONS", 12);
    let restart_after = env_number("TCPLOCK_LO_RESTART_AFTER", 5);
    let restart_rss_mib = env_number("TCPLOCK_LO_RESTART_RSS_MIB", 1024);

    let work = scratch_dir("real-office");
    let profile = work.join("profile");
    let _reaper = OfficeReaper(profile.display().to_string());
    let port = unused_port();
    let spawn = format!(
        "soffice --headless --invisible --nologo --norestore \
         -env:UserInstallation=file://{} --accept='socket,host=127.0.0.1,port={port};urp;'",
        profile.display()
    );
    let conf = example("tcplock.conf");
    let upstream = format!("127.0.0.1:{port}");
    let restart_after_arg = restart_after.to_string();
    let restart_rss_arg = format!("{restart_rss_mib}m");
    let mut proxy = Proxy::start(&[
        "-c",
        &conf.to_string_lossy(),
        "-u",
        &upstream,
        "--spawn",
        &spawn,
        "--restart-after",
        &restart_after_arg,
        "--restart-rss",
        &restart_rss_arg,
    ]);
    let converter = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/uno_convert.py");
    let source = work.join("letter.txt");
    let body: String = (0..400)
        .map(|i| format!("Paragraph {i}: the quick brown fox jumps over the lazy dog.\n"))
        .collect();
    std::fs::write(&source, body).expect("write the document");

    let mut rss_by_gen: BTreeMap<u64, u64> = BTreeMap::new();
    let started = Instant::now();
    for n in 0..conversions {
        let out = work.join(format!("out-{n}.pdf"));
        let mut child = Command::new(&python)
            .arg(converter)
            .arg(proxy.port().to_string())
            .arg(&source)
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run uno_convert.py");
        let mut status = None;
        wait_until(Duration::from_secs(120), || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("conversion {n} did not finish within 120 s");
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(status.success(), "conversion {n} failed ({status}): {err}");
        let pdf = std::fs::read(&out).expect("the PDF");
        assert!(pdf.starts_with(b"%PDF"), "conversion {n}: not a PDF");
        // The office that converted it, measured right after.
        if let Some(&(generation, leader)) = starts(&proxy).last() {
            let rss = session_rss_kib(leader);
            let peak = rss_by_gen.entry(generation).or_default();
            *peak = (*peak).max(rss);
        }
    }
    let elapsed = started.elapsed();

    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for reason in reasons(&proxy, "upstream_starting").into_iter().skip(1) {
        *by_reason.entry(reason).or_default() += 1;
    }
    eprintln!(
        "real LibreOffice: {conversions} conversions in {elapsed:?} \
         (restart-after {restart_after}, restart-rss {restart_rss_mib}m); \
         restarts by reason {by_reason:?}; peak office RSS per generation (KiB) {rss_by_gen:?}"
    );
    assert!(
        proxy.wait_for_count(outcome("ok"), conversions as usize, WAIT),
        "not every conversion was logged as ok"
    );
    assert_eq!(proxy.count_logs(outcome("ok")) as u64, conversions);
    assert_eq!(proxy.count_logs(event("upstream_start_failed")), 0);
    let expected_after_n = conversions
        .saturating_sub(1)
        .checked_div(restart_after)
        .unwrap_or(0) as usize;
    if restart_rss_mib >= 1024 {
        assert_eq!(
            by_reason.get("after_n").copied().unwrap_or(0),
            expected_after_n
        );
    }
    let leaders: Vec<u32> = starts(&proxy).iter().map(|&(_, pid)| pid).collect();
    let status = proxy.stop(Duration::from_secs(60)).expect("tcplock exits");
    assert!(status.success(), "{status:?}");
    for leader in leaders {
        assert!(
            session_members(leader).is_empty(),
            "office processes of session {leader} left after tcplock exited"
        );
    }
}
