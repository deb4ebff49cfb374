//! Addressing a pool of upstream instances (issue 12), end to end through
//! the binary: `-u` lists and ranges, `-p` ranges, the config file's
//! `upstream =` and `proxy-port =`; every bad list or range refused in one
//! line naming the flag (exit 2) or `FILE:LINE` (exit 1) and quoting the
//! value; `--check` writing the pool back in a form that reads back; the
//! reload line naming the new list; and the library's `Builder::upstreams`.
mod common;
mod hookkit;

use std::process::Output;
use std::time::Duration;

use common::*;
use hookkit::*;

const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The one `tcplock: ` line a failed run printed, checking its exit code.
fn refused(args: &[&str], code: i32) -> String {
    let out: Output = run(args, EXIT_WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed something");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line, got:\n{stderr}");
    lines[0]
        .strip_prefix("tcplock: ")
        .unwrap_or_else(|| panic!("{args:?}: no `tcplock: ` prefix: {stderr}"))
        .to_string()
}

/// The `upstream = ...` line of a `--check` output, its value only.
fn upstream_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("upstream = "))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    lines[0].to_string()
}

/// A `--check` output fed back through `-c`: the same settings come out.
fn assert_reads_back(text: &str) {
    let dir = TempDir::new("pool-check");
    let path = dir.write_atomic("checked.conf", text);
    let again = check_ok(&["-c", &path.to_string_lossy()]);
    assert_eq!(again, text, "did not read back the same");
}

#[test]
fn bad_ranges_and_lists_are_refused_naming_the_flag_and_quoting_the_value() {
    let u = |value: &str| refused(&["-l", "127.0.0.1:0", "-u", value], 2);
    assert_eq!(
        u("127.0.0.1:8103-8100"),
        "-u/--upstream: invalid port range '127.0.0.1:8103-8100': 8103 is above 8100"
    );
    assert_eq!(
        u("127.0.0.1:1-1025"),
        "-u/--upstream: the range '127.0.0.1:1-1025' makes 1025 instances (at most 1024)"
    );
    assert_eq!(
        u("127.0.0.1:1,127.0.0.1:2-5"),
        "-u/--upstream: the list '127.0.0.1:1,127.0.0.1:2-5' mixes in the range \
         '127.0.0.1:2-5' (give a list or one range)"
    );
    assert_eq!(
        u("127.0.0.1:0-3"),
        "-u/--upstream: invalid port range '127.0.0.1:0-3': ports must be 1-65535"
    );
    assert_eq!(
        u("127.0.0.1:65535-65536"),
        "-u/--upstream: invalid port range '127.0.0.1:65535-65536': ports must be 1-65535"
    );
    assert_eq!(
        u("a:1,b:0"),
        "-u/--upstream: invalid address 'b:0': port must be 1-65535 (in the list 'a:1,b:0')"
    );
    assert_eq!(
        u("a:1,,b:2"),
        "-u/--upstream: the list 'a:1,,b:2' has an empty element"
    );
    assert_eq!(
        u("a:1,b:2,a:1"),
        "-u/--upstream: the list 'a:1,b:2,a:1' names 'a:1' twice"
    );
    assert_eq!(
        u("[::1]:5,[::1]:6,[0::1]:5"),
        "-u/--upstream: the list '[::1]:5,[::1]:6,[0::1]:5' names '[0::1]:5' twice"
    );
    let many: Vec<String> = (1..=1025).map(|port| format!("127.0.0.1:{port}")).collect();
    assert_eq!(
        u(&many.join(",")),
        "-u/--upstream: the list '127.0.0.1:1,127.0.0.1:2,127.0.0.1:3,...' has 1025 \
         instances (at most 1024)"
    );

    let p = |value: &str| refused(&["-l", "127.0.0.1:0", "-h", "127.0.0.1", "-p", value], 2);
    assert_eq!(
        p("8103-8100"),
        "-p/--proxy-port: invalid port range '8103-8100': 8103 is above 8100"
    );
    assert_eq!(
        p("1-2000"),
        "-p/--proxy-port: the range '1-2000' makes 2000 instances (at most 1024)"
    );
    assert_eq!(
        p("1,2-5"),
        "-p/--proxy-port: the list '1,2-5' mixes in the range '2-5' (give a list or one range)"
    );
    assert_eq!(p("5,5"), "-p/--proxy-port: the list '5,5' names '5' twice");
    assert_eq!(
        p("5,,6"),
        "-p/--proxy-port: the list '5,,6' has an empty element"
    );
}

#[test]
fn a_single_upstream_is_refused_as_before() {
    // The messages a lone address always had, byte for byte.
    assert_eq!(
        refused(&["-l", "127.0.0.1:0", "-u", "a:0"], 2),
        "-u/--upstream: invalid address 'a:0': port must be 1-65535"
    );
    assert_eq!(
        refused(&["-l", "127.0.0.1:0", "-u", "a:5-"], 2),
        "-u/--upstream: invalid address 'a:5-': port must be 1-65535"
    );
    assert_eq!(
        refused(&["-l", "127.0.0.1:0", "-p", "0"], 2),
        "-p/--proxy-port: invalid port '0' (use 1-65535)"
    );
}

#[test]
fn a_bad_pool_in_the_file_names_its_line_and_exits_1() {
    let dir = TempDir::new("pool-file");
    let cases = [
        (
            "upstream = 127.0.0.1:8103-8100",
            "upstream: invalid port range '127.0.0.1:8103-8100': 8103 is above 8100",
        ),
        (
            "upstream = a:1,b:2-5",
            "upstream: the list 'a:1,b:2-5' mixes in the range 'b:2-5' (give a list or one range)",
        ),
        (
            "upstream = a:1,,b:2",
            "upstream: the list 'a:1,,b:2' has an empty element",
        ),
        (
            "upstream = a:1,A:1",
            "upstream: the list 'a:1,A:1' names 'A:1' twice",
        ),
        (
            "proxy-port = 9-1",
            "proxy-port: invalid port range '9-1': 9 is above 1",
        ),
        (
            "proxy-port = 1-1025",
            "proxy-port: the range '1-1025' makes 1025 instances (at most 1024)",
        ),
    ];
    for (line, message) in cases {
        let path = dir.write_atomic("bad.conf", &format!("# a pool\nlisten = 0\n{line}\n"));
        let path = path.to_string_lossy();
        assert_eq!(
            refused(&["-c", &path], 1),
            format!("{path}:3: {message}"),
            "{line}"
        );
    }
}

#[test]
fn a_spawned_pool_must_be_on_this_host_a_plain_one_anywhere() {
    let args = |upstream: &'static str| {
        [
            "--check",
            "-l",
            "127.0.0.1:1",
            "--spawn",
            "exec true",
            "-u",
            upstream,
        ]
    };
    assert_eq!(
        refused(&args("127.0.0.1:5,203.0.113.7:6"), 2),
        "--spawn: the upstream '203.0.113.7:6' is not an address of this host; \
         a service tcplock runs must listen here"
    );
    let text = check_ok(&args("127.0.0.1:5,[::1]:6,localhost:7")[1..]);
    assert_eq!(upstream_line(&text), "127.0.0.1:5,[::1]:6,localhost:7");
    // Without --spawn, tcplock only connects: instances may be anywhere.
    let text = check_ok(&["-l", "127.0.0.1:1", "-u", "127.0.0.1:5,203.0.113.7:6"]);
    assert_eq!(upstream_line(&text), "127.0.0.1:5,203.0.113.7:6");
}

#[test]
fn check_writes_a_range_as_a_range_and_a_list_as_a_list_and_both_read_back() {
    // Consecutive ports of one host are written as one range.
    let text = check_ok(&["-l", "127.0.0.1:1", "-u", "127.0.0.1:8100-8103"]);
    assert_eq!(upstream_line(&text), "127.0.0.1:8100-8103");
    for port in 8100..=8103 {
        let comment = format!("# upstream 127.0.0.1:{port} resolves to 127.0.0.1:{port}\n");
        assert!(text.contains(&comment), "{text}");
    }
    assert_reads_back(&text);

    // The 2011 flags make the same pool, written as `upstream`.
    let old_style = check_ok(&["-l", "127.0.0.1:1", "-h", "127.0.0.1", "-p", "8100-8103"]);
    assert_eq!(old_style, text);

    // A list written in order, also when its ports are consecutive but
    // reversed, or its hosts differ.
    let cases = [
        (
            "127.0.0.1:8101,127.0.0.1:8100",
            "127.0.0.1:8101,127.0.0.1:8100",
        ),
        ("127.0.0.1:5, [::1]:5", "127.0.0.1:5,[::1]:5"),
        ("127.0.0.1:5,127.0.0.1:6", "127.0.0.1:5-6"),
        ("[::1]:5-8", "[::1]:5-8"),
        ("127.0.0.1:9", "127.0.0.1:9"),
    ];
    for (given, written) in cases {
        let text = check_ok(&["-l", "127.0.0.1:1", "-u", given]);
        assert_eq!(upstream_line(&text), written, "{given}");
        assert_reads_back(&text);
    }

    // The largest pool reads back too.
    let text = check_ok(&["-l", "127.0.0.1:1", "-u", "127.0.0.1:10001-11024"]);
    assert_eq!(upstream_line(&text), "127.0.0.1:10001-11024");
    assert_reads_back(&text);
}

#[test]
fn help_tells_of_lists_and_ranges() {
    let out = run(&["--help"], EXIT_WAIT);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("HOST:PORT,HOST:PORT,... or HOST:FIRST-LAST"),
        "{help}"
    );
    assert!(help.contains("FIRST-LAST or PORT,PORT,... for"), "{help}");
}

#[test]
fn a_reload_names_the_new_list_and_the_added_instance_serves() {
    let first = Upstream::echo();
    let second = Upstream::echo();
    let dir = TempDir::new("pool-reload");
    let conf = |upstream: &str| {
        let text = format!("listen = 127.0.0.1:0\nupstream = {upstream}\n");
        dir.write_atomic("tcplock.conf", &text)
            .to_string_lossy()
            .into_owned()
    };
    let path = conf(&first.arg());
    let proxy = Proxy::start_raw(&["-c", &path]);
    let mut client = proxy.connect();
    roundtrip(&mut client, b"through instance 1\n");
    finish(client);

    let list = format!("{},{}", first.arg(), second.arg());
    conf(&list);
    proxy.signal("HUP");
    let reloaded = proxy.expect_log(event("reloaded"), "the reload of the list");
    assert_eq!(field(&reloaded, "changed").as_deref(), Some("upstream"));
    assert_eq!(field(&reloaded, "upstream"), Some(list), "{reloaded}");
    // With instance 1's permit held, the added instance takes the next.
    let held = holding(&proxy);
    let mut client = proxy.connect();
    roundtrip(&mut client, b"through instance 2\n");
    finish(client);
    finish(held);
    assert!(
        wait_until(WAIT, || second
            .stats()
            .ended
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1),
        "instance 2 did not serve the client after the reload"
    );
    assert_eq!(
        first
            .stats()
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );

    // A reload to a bad list changes nothing and says why.
    conf("127.0.0.1:9-1");
    proxy.signal("HUP");
    let failed = proxy.expect_log(event("reload_failed"), "the bad list refused");
    let error = field(&failed, "error").unwrap_or_default();
    assert!(
        error.ends_with(":2: upstream: invalid port range '127.0.0.1:9-1': 9 is above 1"),
        "{failed}"
    );
}

#[test]
fn the_builder_takes_a_list() {
    let first = Upstream::echo();
    let lock = tcplock::Lock::builder()
        .listen("127.0.0.1:0")
        .upstreams([first.arg(), "127.0.0.1:9".to_string()])
        .log_level(tcplock::LogLevel::Error)
        .build()
        .expect("build");
    let upstreams: Vec<String> = lock
        .config()
        .upstreams
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(upstreams, [first.arg(), "127.0.0.1:9".to_string()]);
    assert_eq!(lock.config().first_upstream().to_string(), first.arg());
    // A lock started from another's config gets the same list.
    let again = tcplock::Builder::from_config(lock.config().clone())
        .build()
        .expect("build from the config");
    assert_eq!(again.config().upstreams, lock.config().upstreams);
    drop((lock, again));

    let error = |builder: tcplock::Builder| match builder.build() {
        Ok(_) => panic!("built"),
        Err(e) => e.to_string(),
    };
    let base = || tcplock::Lock::builder().listen("127.0.0.1:0");
    assert_eq!(
        error(base().upstreams(Vec::<String>::new())),
        "no upstream: call upstream()"
    );
    assert_eq!(
        error(base().upstreams(["127.0.0.1:5", "127.0.0.1:5"])),
        "upstream: the list '127.0.0.1:5,127.0.0.1:5' names '127.0.0.1:5' twice"
    );
    assert_eq!(
        error(base().upstream("127.0.0.1:7-3")),
        "upstream: invalid port range '127.0.0.1:7-3': 7 is above 3"
    );
}
