//! The settings of the supervised upstream (`--spawn` and the eight that need
//! it): bad input is one line naming the flag (exit 2), the file line
//! (`FILE:LINE`, exit 1), or a `reload_failed` on SIGHUP that leaves the
//! running service alone; `--help` lists them under their own heading.
mod common;
mod officekit;

use common::*;
use officekit::Office;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const EXIT_WAIT: Duration = Duration::from_secs(10);
const L: &str = "127.0.0.1:0";

fn stderr_line(args: &[&str], out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "tcplock {args:?}: want one line, got:\n{err}"
    );
    assert!(lines[0].starts_with("tcplock: "), "{err}");
    lines[0].to_string()
}

/// Runs tcplock, expects exit `code` and one stderr line; returns it.
fn refused(args: &[&str], code: i32) -> String {
    let out = run(args, EXIT_WAIT);
    let line = stderr_line(args, &out);
    assert_eq!(out.status.code(), Some(code), "tcplock {args:?}: {line}");
    line
}

#[test]
fn an_empty_command_or_a_nul_byte_is_refused() {
    // (Nothing at all, `--spawn ''`, means no spawn, as for hooks.)
    for command in ["   ", "\t"] {
        let line = refused(&["-l", L, "-p", "9", "--spawn", command], 2);
        assert_eq!(line, "tcplock: --spawn: the command is empty");
    }
    // A NUL byte cannot come through argv; it can through a file.
    let dir = scratch_dir("nul");
    let path = dir.join("nul.conf");
    std::fs::write(&path, "listen = 0\nupstream = 127.0.0.1:9\nspawn = a\0b\n").unwrap();
    let line = refused(&["-c", path.to_str().unwrap()], 1);
    assert_eq!(
        line,
        format!(
            "tcplock: {}:3: spawn: a command cannot contain a NUL byte",
            path.display()
        )
    );
}

#[test]
fn every_service_setting_without_spawn_names_its_flag() {
    for (flag, value) in [
        ("--ready-timeout", "5s"),
        ("--restart-after", "3"),
        ("--restart-rss", "1g"),
        ("--max-lifetime", "1h"),
        ("--restart-on", "none"),
        ("--idle-stop", "1m"),
        ("--stop-timeout", "1s"),
        ("--start-retries", "9"),
    ] {
        let line = refused(&["-l", L, "-p", "9", flag, value], 2);
        assert!(
            line.starts_with(&format!("tcplock: {flag}: only with spawn")),
            "{line}"
        );
    }
}

#[test]
fn a_service_setting_without_spawn_in_a_file_names_its_line() {
    let dir = scratch_dir("nospawn");
    let path = dir.join("office.conf");
    std::fs::write(
        &path,
        "listen = 0\nupstream = 127.0.0.1:9\n\n# memory cap\nrestart-rss = 1g\n",
    )
    .unwrap();
    let line = refused(&["-c", path.to_str().unwrap()], 1);
    assert!(
        line.starts_with(&format!(
            "tcplock: {}:5: restart-rss: only with spawn",
            path.display()
        )),
        "{line}"
    );
}

#[test]
fn bad_values_name_the_flag() {
    let base = ["-l", L, "-p", "9", "--spawn", "true"];
    let cases: &[(&[&str], &str)] = &[
        (&["--restart-rss", "1t"], "--restart-rss: invalid size '1t'"),
        (
            &["--restart-rss", "512k"],
            "--restart-rss: 524288 bytes is too small",
        ),
        (
            &["--restart-on", "crash"],
            "--restart-on: invalid list 'crash'",
        ),
        (
            &["--restart-on", "none,timeout"],
            "--restart-on: invalid list",
        ),
        (
            &["--restart-after", "x"],
            "--restart-after: invalid number 'x'",
        ),
        (
            &["--ready-timeout", "0"],
            "--ready-timeout: must be longer than 0",
        ),
        (
            &["--start-retries", "0"],
            "--start-retries: '0' is too small",
        ),
        (
            &["--stop-timeout", "1d"],
            "--stop-timeout: invalid duration '1d'",
        ),
        (&["--idle-stop", "-1"], "--idle-stop: invalid duration '-1'"),
        (
            &["--max-lifetime", "1.5h"],
            "--max-lifetime: invalid duration",
        ),
    ];
    for (extra, want) in cases {
        let args = [&base[..], extra].concat();
        let line = refused(&args, 2);
        assert!(
            line.starts_with(&format!("tcplock: {want}")),
            "{args:?}: {line}"
        );
    }
}

#[test]
fn a_literal_upstream_elsewhere_is_refused_at_once() {
    for upstream in ["203.0.113.9:2002", "[2001:db8::1]:2002"] {
        let line = refused(&["-l", L, "-u", upstream, "--spawn", "true"], 2);
        assert!(
            line.starts_with("tcplock: --spawn: the upstream")
                && line.contains("is not an address of this host"),
            "{line}"
        );
    }
}

/// A name is judged by what it resolves to: here `office` resolves (through
/// a private /etc/hosts) to an address that is no interface of this host.
#[test]
fn a_name_resolving_elsewhere_is_refused_once_resolved() {
    let dir = scratch_dir("hosts");
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n203.0.113.9 office\n").unwrap();
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "sh",
            "-c",
            r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#,
        ])
        .arg("sh")
        .arg(&hosts)
        .arg(BIN)
        .args(["-l", L, "-u", "office:2002", "--spawn", "true"])
        .stdin(Stdio::null());
    let out = match command.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: cannot run unshare: {e}");
            return;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("unshare failed") || err.contains("mount") && !err.contains("tcplock:") {
        eprintln!("skipped: needs root for a private /etc/hosts: {err}");
        return;
    }
    let line = stderr_line(&["-u", "office:2002"], &out);
    assert_eq!(out.status.code(), Some(1), "{line}");
    assert!(
        line.contains("spawn: the upstream 'office:2002' is not an address of this host")
            && line.contains("resolves to 203.0.113.9"),
        "{line}"
    );
}

#[test]
fn help_lists_the_service_settings_under_their_heading() {
    let out = run(&["--help"], EXIT_WAIT);
    let help = String::from_utf8_lossy(&out.stdout);
    let section = help
        .split("Supervised upstream")
        .nth(1)
        .unwrap_or_else(|| panic!("no Supervised upstream section:\n{help}"));
    for flag in [
        "--spawn CMD",
        "--ready-timeout DUR",
        "--restart-after N",
        "--restart-rss SIZE",
        "--max-lifetime DUR",
        "--restart-on LIST",
        "--idle-stop DUR",
        "--stop-timeout DUR",
        "--start-retries N",
    ] {
        assert!(section.contains(flag), "{flag} missing:\n{section}");
    }
}

/// A reload that would make the config invalid is refused as a whole and
/// the running service is left as it is: same generation, same process, no
/// stop.
#[test]
fn a_bad_reload_leaves_the_service_running() {
    let office = Office::new("badreload");
    let port = unused_port();
    let dir = scratch_dir("badreload-conf");
    let path = dir.join("tcplock.conf");
    let good = format!(
        "listen = 127.0.0.1:0\nupstream = 127.0.0.1:{port}\nspawn = {}\nrestart-after = 100\n",
        office.command("")
    );
    std::fs::write(&path, &good).unwrap();
    let proxy = Proxy::start_raw(&["-c", path.to_str().unwrap()]);
    let ready = proxy.expect_log(event("upstream_ready"), "the first generation ready");
    assert_eq!(num_field(&ready, "gen"), 1);
    let mut client = proxy.connect();
    assert_eq!(who(&mut client).0, 1);
    finish(client);

    let bad_files = [
        // The service settings stay, spawn goes.
        format!("listen = 127.0.0.1:0\nupstream = 127.0.0.1:{port}\nrestart-after = 100\n"),
        format!(
            "listen = 127.0.0.1:0\nupstream = 203.0.113.9:{port}\nspawn = {}\n",
            office.command("")
        ),
        format!("{good}start-retries = 0\n"),
    ];
    let wants = [
        ":3: restart-after: only with spawn",
        ":3: spawn: the upstream",
        ":5: start-retries: '0' is too small",
    ];
    for (n, (text, want)) in bad_files.iter().zip(wants).enumerate() {
        std::fs::write(&path, text).unwrap();
        proxy.signal("HUP");
        assert!(
            proxy.wait_for_count(event("reload_failed"), n + 1, WAIT),
            "no reload_failed for {want}"
        );
        let failed = proxy
            .matching(event("reload_failed"))
            .pop()
            .unwrap_or_default();
        let error = field(&failed, "error").unwrap_or_default();
        assert!(
            error.starts_with(&path.display().to_string()) && error.contains(want),
            "want {want}: {failed}"
        );
    }
    // Still the first generation, never stopped, still serving.
    let mut client = proxy.connect();
    assert_eq!(who(&mut client).0, 1);
    finish(client);
    assert_eq!(proxy.count_logs(event("upstream_stopping")), 0);
    assert_eq!(proxy.count_logs(event("restart_due")), 0);
    assert_eq!(office.count("wrapper_start"), 1);
    office.assert_never_two();
}

fn who(client: &mut std::net::TcpStream) -> (u64, u32) {
    officekit::who(client)
}

fn scratch_dir(name: &str) -> std::path::PathBuf {
    officekit::scratch_dir(&format!("settings-{name}"))
}
