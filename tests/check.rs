//! `tcplock --check`: validates everything a start would, resolves the
//! upstream, binds nothing, and prints the settings in force as a config
//! file that reads back to the same settings.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Upstream, check_ok, run};

const EXIT_WAIT: Duration = Duration::from_secs(10);

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcplock-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `--check ARGS` that fails: its exit code and its one stderr line.
fn check_err(args: &[&str]) -> (i32, String) {
    let mut full = vec!["--check"];
    full.extend_from_slice(args);
    let out = run(&full, EXIT_WAIT);
    assert!(out.stdout.is_empty(), "{full:?} printed settings");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{full:?}: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        stderr.trim_end().to_string(),
    )
}

/// Every setting key, from `--help` (the settings table's own listing).
fn setting_keys() -> Vec<String> {
    let help = String::from_utf8(run(&["--help"], EXIT_WAIT).stdout).unwrap();
    let mut keys: Vec<String> = help
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| {
            flag.split(['[', ' ', '='])
                .next()
                .unwrap_or(flag)
                .trim_end_matches(',')
                .to_string()
        })
        .filter(|key| {
            !key.is_empty()
                && ![
                    "config",
                    "check",
                    "version",
                    "help",
                    "proxy-port",
                    "proxy-host",
                ]
                .contains(&key.as_str())
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert!(keys.len() >= 19, "settings in --help: {keys:?}");
    keys
}

/// `key = value` lines (comments aside), as (key, value).
fn settings(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key = value: {line:?}"));
            (key.trim().to_string(), value.trim().to_string())
        })
        .collect()
}

#[test]
fn check_prints_every_setting_once_and_binds_nothing() {
    let upstream = Upstream::echo();
    // The listen port is taken: a check that bound it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = check_ok(&["-l", &listen, "-u", &upstream.arg(), "-t", "20s"]);
    assert!(
        out.contains(&format!(
            "\n# upstream {0} resolves to {0}\n",
            upstream.arg()
        )),
        "{out}"
    );
    let lines = settings(&out);
    let keys: Vec<&str> = lines.iter().map(|(k, _)| k.as_str()).collect();
    for key in setting_keys() {
        let n = keys.iter().filter(|k| **k == key).count();
        assert_eq!(n, 1, "{key} written {n} times:\n{out}");
    }
    let value = |key: &str| {
        lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(value("listen"), listen);
    assert_eq!(value("timeout"), "20s");
    assert_eq!(value("permits"), "1");
    assert_eq!(value("on-activate"), "");
    assert_eq!(value("connect-timeout"), "10s");
}

#[test]
fn check_output_read_back_gives_the_same_settings() {
    let upstream = Upstream::echo();
    let conf = scratch(
        "first.conf",
        &format!(
            "listen = 127.0.0.1:0\n\
             proxy-host = 127.0.0.1\n\
             proxy-port = {}\n\
             permits = 3\n\
             timeout = 90000\n\
             queue-timeout = 1500ms\n\
             max-queue = 0\n\
             connect-timeout = 0\n\
             buffer-size = 64k\n\
             on-activate = ./restart.sh --mode=fast # not a comment\n\
             hook-timeout = 2h\n\
             shutdown-grace = 0\n\
             shutdown-queue = SERVE\n\
             stall-warn = 5m\n\
             log-level = debug\n\
             queued-eof = drop\n\
             splice = off\n\
             send-proxy = v1\n\
             accept-proxy = yes\n",
            upstream.port()
        ),
    );
    // Flags win over the file, in the check as in a start.
    let first = check_ok(&[
        "-c",
        conf.to_str().unwrap(),
        "-n",
        "4",
        "--on-timeout",
        "echo timed out",
    ]);
    let again = scratch("again.conf", &first);
    let second = check_ok(&["-c", again.to_str().unwrap()]);
    assert_eq!(second, first);
    let lines = settings(&first);
    for expected in [
        ("permits", "4"),
        ("timeout", "90s"),
        ("queue-timeout", "1500ms"),
        ("buffer-size", "65536"),
        ("on-activate", "./restart.sh --mode=fast # not a comment"),
        ("on-timeout", "echo timed out"),
        ("hook-timeout", "2h"),
        ("shutdown-queue", "serve"),
        ("accept-proxy", "on"),
        ("upstream", &upstream.arg() as &str),
    ] {
        assert!(
            lines
                .iter()
                .any(|(k, v)| k == expected.0 && v == expected.1),
            "{expected:?} in\n{first}"
        );
    }
}

#[test]
fn check_errors_are_one_line_with_the_usual_exit_codes() {
    let bad = scratch("bad.conf", "listen = 9000\npermits = 0\n");
    let (code, err) = check_err(&["-c", bad.to_str().unwrap(), "-p", "1"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "tcplock: {}:2: permits: '0' is too small (at least 1)",
            bad.display()
        )
    );
    let (code, err) = check_err(&["-l", "9000", "-p", "1", "-n", "0"]);
    assert_eq!(code, 2);
    assert_eq!(err, "tcplock: -n/--permits: '0' is too small (at least 1)");
    let (code, err) = check_err(&["-l", "9000"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("tcplock: no upstream"), "{err}");
    let (code, err) = check_err(&["-l", "9000", "-u", "no-such-host.invalid:80"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("tcplock: cannot resolve upstream 'no-such-host.invalid:80'"),
        "{err}"
    );
    let (code, err) = check_err(&["-l", "no-such-host.invalid:80", "-p", "1"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("tcplock: cannot resolve listen address"),
        "{err}"
    );
    let (code, err) = check_err(&["--check"]);
    assert_eq!((code, err.as_str()), (2, "tcplock: --check given twice"));
}

#[test]
fn check_without_a_listen_address_leaves_it_to_socket_activation() {
    let upstream = Upstream::echo();
    let out = check_ok(&["-u", &upstream.arg()]);
    assert!(
        out.contains("\n# listen = (none: socket activation passes the listening socket)\n"),
        "{out}"
    );
    assert!(!settings(&out).iter().any(|(k, _)| k == "listen"));
}

/// What a start says for `args`: its exit code and its one stderr line.
fn start_err(args: &[&str]) -> (i32, String) {
    let out = run(args, EXIT_WAIT);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("tcplock: "))
        .unwrap_or_else(|| panic!("{args:?}: no error line in {stderr}"))
        .to_string();
    (out.status.code().unwrap_or(-1), line)
}

#[test]
fn check_refuses_the_control_and_metrics_settings_a_start_refuses() {
    let upstream = Upstream::echo();
    let up = upstream.arg();
    let plain = scratch("plainfile", "not a socket\n");
    let plain = plain.to_str().unwrap();
    for extra in [
        ["--metrics", "no-such-host.invalid:9464"],
        ["--control", plain],
        ["--control", "/nonexistent-dir/x.sock"],
    ] {
        let mut args = vec!["-l", "127.0.0.1:0", "-u", up.as_str()];
        args.extend_from_slice(&extra);
        let started = start_err(&args);
        assert_eq!(started.0, 1, "{args:?}: {started:?}");
        let mut checked = vec!["--check"];
        checked.extend_from_slice(&args);
        let out = run(&checked, EXIT_WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        assert!(out.stdout.is_empty(), "{checked:?} printed settings");
        assert_eq!(
            (out.status.code().unwrap_or(-1), stderr),
            started,
            "{checked:?}"
        );
    }
}

#[test]
fn check_output_with_control_and_metrics_reads_back() {
    let upstream = Upstream::echo();
    let dir = std::env::temp_dir().join(format!("tcplock-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("readback.sock");
    let first = check_ok(&[
        "-l",
        "127.0.0.1:0",
        "-u",
        &upstream.arg(),
        "--control",
        sock.to_str().unwrap(),
        "--metrics",
        "9464",
    ]);
    let again = scratch("control-metrics.conf", &first);
    let second = check_ok(&["-c", again.to_str().unwrap()]);
    assert_eq!(second, first);
    let lines = settings(&first);
    for expected in [
        ("control", sock.to_str().unwrap()),
        ("metrics", "127.0.0.1:9464"),
    ] {
        assert!(
            lines
                .iter()
                .any(|(k, v)| k == expected.0 && v == expected.1),
            "{expected:?} in\n{first}"
        );
    }
    assert!(!sock.exists(), "--check created the control socket");
}
