//! The `-c FILE` config file, end to end: errors at start name FILE:LINE and
//! exit 1, comments and `=`/`#` inside values, and command-line flags winning
//! over the file at start and at every reload.

mod common;
mod hookkit;

use std::time::Duration;

use common::*;
use hookkit::*;

/// Runs `tcplock -c FILE` on a file holding `text` and expects exit 1 with a
/// one-line message naming `FILE:line`.
fn expect_start_error(text: &str, line: usize, mentions: &str) {
    let dir = TempDir::new("conf-err");
    let path = dir.write_atomic("bad.conf", text);
    let path = path.to_string_lossy().into_owned();
    let out = run(&["-c", &path], WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text:?} gave {stderr}");
    assert!(
        stderr.contains(&format!("{path}:{line}:")),
        "{text:?}: stderr should name {path}:{line}, got: {stderr}"
    );
    assert!(
        stderr.contains(mentions),
        "{text:?}: stderr should mention {mentions:?}, got: {stderr}"
    );
    assert!(!stderr.contains("event=listening"), "{stderr}");
}

#[test]
fn start_errors_name_the_file_and_line_and_exit_1() {
    let head = "# a comment\n\nlisten = 127.0.0.1:0\nupstream = 127.0.0.1:9\n";
    expect_start_error(&format!("{head}bogus = 1\n"), 5, "bogus");
    expect_start_error(&format!("{head}permits = 2\npermits = 3\n"), 6, "permits");
    expect_start_error(&format!("{head}timeout = soon\n"), 5, "soon");
    expect_start_error(&format!("{head}permits = -1\n"), 5, "permits");
    expect_start_error(&format!("{head}just some words\n"), 5, "just some words");
    expect_start_error("listen = 127.0.0.1:0\nupstream = nowhere\n", 2, "upstream");
}

#[test]
fn a_missing_config_file_exits_1_naming_it() {
    let dir = TempDir::new("conf-missing");
    let path = dir.join("does-not-exist.conf");
    let path = path.to_string_lossy().into_owned();
    let out = run(&["-c", &path], WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&path), "{stderr}");
}

#[test]
fn the_file_alone_configures_the_proxy_and_values_keep_equals_and_hashes() {
    let dir = TempDir::new("conf-values");
    let upstream = Upstream::echo();
    let out = dir.join("out");
    // The whole rest of the line is the command, `=` and `#` included.
    let hook = format!(
        "printf '%s\\n' 'a=b # not a comment' > {}",
        sh_quote(&out.to_string_lossy())
    );
    let text = format!(
        "# tcplock test config\n\n   # indented comment\nlisten = 127.0.0.1:0\n\
         upstream = {}\npermits = 2\n  on-activate   =   {hook}   \nhook-timeout = 5s\n",
        upstream.arg()
    );
    let file = dir.write_atomic("tcplock.conf", &text);
    let proxy = Proxy::start_raw(&["-c", &file.to_string_lossy()]);
    let listening = proxy.expect_log(event("listening"), "listening");
    assert_eq!(num_field(&listening, "permits"), 2, "{listening}");

    let mut c = proxy.connect();
    roundtrip(&mut c, b"configured by file\n");
    finish(c);
    assert_eq!(dir.read("out"), "a=b # not a comment\n");
}

#[test]
fn command_line_flags_win_over_the_file() {
    let dir = TempDir::new("conf-cli");
    let upstream = Upstream::echo();
    let from_file = dir.script("file.sh", "echo \"$TCPLOCK_CONN_ID\" >> \"$D/ran-file\"");
    let from_cli = dir.script("cli.sh", "echo \"$TCPLOCK_CONN_ID\" >> \"$D/ran-cli\"");
    // The file's upstream is dead; `-u` replaces it (not a conflict), and
    // `-n`, `--on-activate` replace the file's values.
    let dead = unused_port();
    let text = format!(
        "listen = 127.0.0.1:0\nupstream = 127.0.0.1:{dead}\npermits = 1\non-activate = {from_file}\n"
    );
    let file = dir.write_atomic("tcplock.conf", &text);
    let file = file.to_string_lossy().into_owned();
    let proxy = Proxy::start_raw(&[
        "-c",
        &file,
        "-u",
        &upstream.arg(),
        "-n",
        "3",
        "--on-activate",
        &from_cli,
    ]);
    let listening = proxy.expect_log(event("listening"), "listening");
    assert_eq!(num_field(&listening, "permits"), 3, "{listening}");
    assert_eq!(
        field(&listening, "upstream").as_deref(),
        Some(upstream.arg().as_str())
    );
    let mut c = proxy.connect();
    roundtrip(&mut c, b"one\n");
    finish(c);
    assert_eq!(dir.lines("ran-cli"), ["1"]);

    // At a reload too: the file changes, the command line still wins.
    let text = format!(
        "listen = 127.0.0.1:0\nupstream = 127.0.0.1:{dead}\npermits = 1\n\
         on-activate = {from_file}\nconnect-timeout = 3s\n"
    );
    dir.write_atomic("tcplock.conf", &text);
    proxy.signal("HUP");
    let reloaded = proxy.expect_log(event("reloaded"), "reloaded");
    assert_eq!(
        field(&reloaded, "changed").as_deref(),
        Some("connect-timeout"),
        "{reloaded}"
    );
    let mut c = proxy.connect();
    roundtrip(&mut c, b"two\n");
    finish(c);
    assert_eq!(dir.lines("ran-cli"), ["1", "2"]);
    assert_eq!(dir.read("ran-file"), "", "the file's hook never ran");
}

#[test]
fn command_line_port_replaces_the_files_proxy_host_and_port() {
    let dir = TempDir::new("conf-port");
    let upstream = Upstream::echo();
    let dead = unused_port();
    let text = format!("listen = 127.0.0.1:0\nproxy-host = 127.0.0.1\nproxy-port = {dead}\n");
    let file = dir.write_atomic("tcplock.conf", &text);
    let proxy = Proxy::start_raw(&[
        "-c",
        &file.to_string_lossy(),
        "-p",
        &upstream.port().to_string(),
    ]);
    let mut c = proxy.connect();
    roundtrip(&mut c, b"to the port from the command line\n");
    finish(c);
    assert!(wait_until(Duration::from_secs(2), || upstream.accepted() == 1));
}

/// Makes a FIFO at `path` (nobody ever writes to it).
fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "mkfifo {}",
        path.display()
    );
}

#[test]
fn a_config_file_that_is_not_a_regular_file_is_refused_at_start() {
    let dir = TempDir::new("conf-kind");
    let fifo = dir.join("fifo.conf");
    mkfifo(&fifo);
    let zero = dir.join("zero.conf");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    for path in [&fifo, &zero] {
        let path = path.to_string_lossy().into_owned();
        // `run` gives up after WAIT: reading the FIFO would hang, /dev/zero
        // would be read until memory runs out.
        let out = run(&["-c", &path], WAIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path}: {stderr}");
        assert_eq!(
            stderr.trim(),
            format!("tcplock: {path}: not a regular file")
        );
    }
    let big = dir.write_atomic("big.conf", &"#\n".repeat(600 * 1024));
    let big = big.to_string_lossy().into_owned();
    let out = run(&["-c", &big], WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim(), format!("tcplock: {big}: larger than 1 MiB"));
}

#[test]
fn sighup_refuses_a_fifo_or_an_impossible_hook_and_keeps_serving() {
    let dir = TempDir::new("conf-hup-kind");
    let upstream = Upstream::echo();
    let conf = |extra: &str| {
        let text = format!(
            "listen = 127.0.0.1:0\nupstream = {}\n{extra}",
            upstream.arg()
        );
        dir.write_atomic("tcplock.conf", &text)
            .to_string_lossy()
            .into_owned()
    };
    let path = conf("");
    let proxy = Proxy::start_raw(&["-c", &path]);

    // Swapped for a FIFO: a blocking open would freeze every relay.
    std::fs::remove_file(&path).expect("remove");
    mkfifo(std::path::Path::new(&path));
    proxy.signal("HUP");
    let failed = proxy.expect_log(event("reload_failed"), "reload_failed for the FIFO");
    assert_eq!(
        field(&failed, "error").as_deref(),
        Some(format!("{path}: not a regular file").as_str()),
        "{failed}"
    );
    let mut client = proxy.connect();
    roundtrip(&mut client, b"served while the file is a FIFO\n");
    finish(client);

    // A hook with a NUL byte could never be run: refused, naming its line.
    std::fs::remove_file(&path).expect("remove");
    conf("on-activate = true\0false\n");
    proxy.signal("HUP");
    assert!(
        proxy.wait_for_count(event("reload_failed"), 2, WAIT),
        "no second reload_failed: {:?}",
        proxy.logs()
    );
    let failed = proxy
        .matching(event("reload_failed"))
        .pop()
        .unwrap_or_default();
    let error = field(&failed, "error").unwrap_or_default();
    assert!(
        error.starts_with(&format!("{path}:3: on-activate:")),
        "{failed}"
    );
    assert!(error.contains("NUL"), "{failed}");
    let mut client = proxy.connect();
    roundtrip(&mut client, b"still served, no hook\n");
    finish(client);
    assert_eq!(proxy.count_logs(event("hook_started")), 0);
}
