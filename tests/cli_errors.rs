//! Command line: every usage error exits 2 with one `tcplock: ...` line on
//! stderr naming the flag; start failures exit 1; --help and -V print to
//! stdout and exit 0.
mod common;

use common::*;
use std::net::TcpListener;
use std::process::Output;
use std::time::Duration;

const EXIT_WAIT: Duration = Duration::from_secs(10);

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs tcplock with `args`, expects exit 2 and a single `tcplock: ` line
/// that contains, for each group in `mentions`, at least one of its words.
fn assert_usage_error(args: &[&str], mentions: &[&[&str]]) {
    let out = run(args, EXIT_WAIT);
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "tcplock {args:?}: exit status; stderr:\n{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "tcplock {args:?}: want exactly one stderr line, got:\n{err}"
    );
    assert!(
        lines[0].starts_with("tcplock: "),
        "tcplock {args:?}: line should start `tcplock: `: {err}"
    );
    for group in mentions {
        assert!(
            group.iter().any(|w| lines[0].contains(w)),
            "tcplock {args:?}: message should mention one of {group:?}: {err}"
        );
    }
}

const L: &str = "127.0.0.1:0";

#[test]
fn unknown_flag() {
    assert_usage_error(&["-l", L, "-p", "9", "--bogus"], &[&["--bogus"]]);
}

#[test]
fn stray_argument() {
    assert_usage_error(&["-l", L, "-p", "9", "extra"], &[&["extra"]]);
}

#[test]
fn no_upstream() {
    assert_usage_error(&["-l", L], &[&["upstream", "-u", "-p", "--proxy-port"]]);
}

#[test]
fn upstream_together_with_proxy_port() {
    assert_usage_error(
        &["-l", L, "-u", "127.0.0.1:9", "-p", "9"],
        &[&["-u", "--upstream"], &["-p", "--proxy-port"]],
    );
}

#[test]
fn upstream_together_with_proxy_host() {
    assert_usage_error(
        &["-l", L, "-u", "127.0.0.1:9", "-h", "localhost"],
        &[&["-u", "--upstream"], &["-h", "--proxy-host"]],
    );
}

#[test]
fn bad_proxy_port() {
    assert_usage_error(
        &["-l", L, "-p", "abc"],
        &[&["-p", "--proxy-port"], &["abc"]],
    );
    assert_usage_error(
        &["-l", L, "-p", "70000"],
        &[&["-p", "--proxy-port"], &["70000"]],
    );
}

#[test]
fn missing_value() {
    assert_usage_error(&["-l", L, "-p"], &[&["-p", "--proxy-port"]]);
    // -h is the proxy host (as in the original), not help.
    assert_usage_error(&["-h"], &[&["-h", "--proxy-host"]]);
}

#[test]
fn bad_listen_address() {
    assert_usage_error(
        &["-l", "127.0.0.1:notaport", "-p", "9"],
        &[&["-l", "--listen"], &["notaport"]],
    );
}

#[test]
fn bad_permits() {
    assert_usage_error(&["-l", L, "-p", "9", "-n", "0"], &[&["-n", "--permits"]]);
    assert_usage_error(
        &["-l", L, "-p", "9", "-n", "many"],
        &[&["-n", "--permits"], &["many"]],
    );
}

#[test]
fn bad_durations() {
    assert_usage_error(
        &["-l", L, "-p", "9", "-t", "5x"],
        &[&["-t", "--timeout"], &["5x"]],
    );
    assert_usage_error(
        &["-l", L, "-p", "9", "--queue-timeout", "soon"],
        &[&["--queue-timeout"], &["soon"]],
    );
    assert_usage_error(
        &["-l", L, "-p", "9", "--connect-timeout", "1y"],
        &[&["--connect-timeout"], &["1y"]],
    );
}

#[test]
fn bad_max_queue() {
    assert_usage_error(
        &["-l", L, "-p", "9", "--max-queue", "lots"],
        &[&["--max-queue"], &["lots"]],
    );
}

#[test]
fn bad_buffer_size() {
    assert_usage_error(
        &["-l", L, "-p", "9", "--buffer-size", "big"],
        &[&["--buffer-size"], &["big"]],
    );
}

#[test]
fn bad_log_level() {
    assert_usage_error(
        &["-l", L, "-p", "9", "--log-level", "loud"],
        &[&["--log-level"], &["loud"]],
    );
}

#[test]
fn listen_address_in_use_exits_1() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run(&["-l", &addr, "-p", "9"], EXIT_WAIT);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr:\n{err}");
    let port = addr.rsplit(':').next().unwrap_or_default();
    assert!(
        err.contains(port),
        "message should name the address {addr}: {err}"
    );
    drop(taken);
}

#[test]
fn unresolvable_upstream_exits_1() {
    let out = run(&["-l", L, "-u", "no-such-host.invalid:80"], EXIT_WAIT);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr:\n{err}");
    assert!(
        err.contains("no-such-host.invalid"),
        "message should name the host: {err}"
    );

    let out = run(
        &["-l", L, "-h", "no-such-host.invalid", "-p", "80"],
        EXIT_WAIT,
    );
    let err = stderr_of(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "-h/-p form: exit status; stderr:\n{err}"
    );
    assert!(
        err.contains("no-such-host.invalid"),
        "message should name the host: {err}"
    );
}

#[test]
fn help_lists_every_flag() {
    let out = run(&["--help"], EXIT_WAIT);
    assert_eq!(out.status.code(), Some(0), "--help exit status");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "-l",
        "--listen",
        "-p",
        "--proxy-port",
        "-h",
        "--proxy-host",
        "-u",
        "--upstream",
        "-n",
        "--permits",
        "-t",
        "--timeout",
        "--queue-timeout",
        "--max-queue",
        "--connect-timeout",
        "--buffer-size",
        "--log-level",
        "-V",
        "--version",
        "--help",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn help_shows_defaults() {
    let out = run(&["--help"], EXIT_WAIT);
    let help = String::from_utf8_lossy(&out.stdout);
    for (what, any_of) in [
        ("--max-queue default", &["1024"][..]),
        ("--connect-timeout default", &["10s", "10 s"][..]),
        ("--buffer-size default", &["16k", "16K", "16384"][..]),
    ] {
        assert!(
            any_of.iter().any(|w| help.contains(w)),
            "--help lacks the {what}:\n{help}"
        );
    }
}

#[test]
fn version_prints_to_stdout() {
    for flag in ["-V", "--version"] {
        let out = run(&[flag], EXIT_WAIT);
        assert_eq!(out.status.code(), Some(0), "{flag} exit status");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(env!("CARGO_PKG_VERSION")),
            "{flag} should print the version {}: {text}",
            env!("CARGO_PKG_VERSION")
        );
    }
}

#[test]
fn an_upstream_that_is_tcplocks_own_listener_exits_1() {
    // Probing a spawned service there would find tcplock itself, forever;
    // without --spawn every client would be proxied back to tcplock.
    let port = unused_port().to_string();
    for (listen, upstream) in [
        (format!("127.0.0.1:{port}"), format!("127.0.0.1:{port}")),
        (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}")),
    ] {
        let out = run(
            &["-l", &listen, "-u", &upstream, "--spawn", "exec sleep 60"],
            EXIT_WAIT,
        );
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "exit status; stderr:\n{err}");
        assert!(
            err.contains(&upstream) && err.contains("own listening address"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
