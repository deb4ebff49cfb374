//! Operating a pool (`-u A,B`): the control socket's `status`, `conns`,
//! `position` and `restart I`, the metrics' per-instance series and the
//! state dump, for two instances.
//!
//! The tests that need clients spread over the instances' own addresses
//! (the pool's connect) or one supervised service per instance are marked
//! so; the rest read the core's per-instance numbers, which hold whatever
//! address a connect goes to.

mod common;
mod hookkit;
mod officekit;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hookkit::TempDir;
use officekit::{Office, SCRIPT, START_WAIT};

/// `tcplock ctl --control PATH WORDS...`: exit code and stdout.
fn ctl(path: &Path, words: &[&str]) -> (i32, String) {
    let path = path.to_str().expect("utf-8 path");
    let mut args = vec!["ctl", "--control", path];
    args.extend_from_slice(words);
    let out = run(&args, Duration::from_secs(60));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `ctl` that must succeed; its reply lines without the final `ok`.
fn ctl_ok(path: &Path, words: &[&str]) -> Vec<String> {
    let (code, out) = ctl(path, words);
    assert_eq!(code, 0, "ctl {words:?}: {out:?}");
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.pop().as_deref(), Some("ok"), "ctl {words:?}: {out:?}");
    lines
}

/// `ctl` that must get an error reply; its `msg`.
fn ctl_err(path: &Path, words: &[&str]) -> String {
    let (code, out) = ctl(path, words);
    assert_eq!(code, 1, "ctl {words:?}: {out:?}");
    let last = out.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error "), "ctl {words:?}: {out:?}");
    field(&last, "msg").unwrap_or_default()
}

/// `status`: tcplock's line, then the instance lines by number.
fn status(sock: &Path) -> (String, Vec<String>) {
    let mut lines = ctl_ok(sock, &["status"]);
    assert!(lines.len() >= 2, "{lines:?}");
    let head = lines.remove(0);
    (head, lines)
}

/// Two echo upstreams and tcplock in front of them with a control socket.
fn pool(dir: &TempDir, extra: &[&str]) -> (Proxy, PathBuf, [Upstream; 2]) {
    let ups = [Upstream::echo(), Upstream::echo()];
    let list = format!("{},{}", ups[0].arg(), ups[1].arg());
    let sock = dir.join("ctl.sock");
    let sock_arg = sock.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["-u", list.as_str(), "--control", sock_arg.as_str()];
    args.extend_from_slice(extra);
    (Proxy::start(&args), sock, ups)
}

#[test]
fn status_shows_a_line_per_instance_and_the_pools_capacity() {
    let dir = TempDir::new("pool-status");
    let (proxy, sock, ups) = pool(&dir, &["-n", "2"]);
    let (head, instances) = status(&sock);
    assert_eq!(num_field(&head, "permits"), 4, "2 instances of 2: {head}");
    assert_eq!(instances.len(), 2, "{instances:?}");
    for (i, (line, up)) in instances.iter().zip(&ups).enumerate() {
        assert_eq!(num_field(line, "instance"), i as u64 + 1, "{line}");
        assert_eq!(field(line, "addr"), Some(up.arg()), "{line}");
        for (key, value) in [
            ("state", "ready"),
            ("supervised", "no"),
            ("gen", "0"),
            ("active", "0"),
            ("conns", "0"),
            ("restarts", "0"),
            ("cooling_down", "no"),
            ("removed", "no"),
        ] {
            assert_eq!(field(line, key).as_deref(), Some(value), "{key} in {line}");
        }
    }
    // Three holders on a pool of two instances of two permits: the first
    // two go to different instances (the one idle longest), the third
    // to either.
    let holders: Vec<_> = (0..3).map(|_| holding(&proxy)).collect();
    let (head, instances) = status(&sock);
    assert_eq!(num_field(&head, "active"), 3, "{head}");
    let active: Vec<u64> = instances.iter().map(|l| num_field(l, "active")).collect();
    assert!(active == [2, 1] || active == [1, 2], "{instances:?}");
    let conns: u64 = instances.iter().map(|l| num_field(l, "conns")).sum();
    assert_eq!(conns, 3, "{instances:?}");
    // The fourth takes the last permit, the fifth waits; `conns` names no
    // instance for it.
    let fourth = holding(&proxy);
    let _waiting = proxy.connect();
    assert!(
        wait_until(WAIT, || num_field(&status(&sock).0, "queued") == 1),
        "{:?}",
        status(&sock)
    );
    let listing = ctl_ok(&sock, &["conns"]);
    assert_eq!(listing.len(), 5, "{listing:?}");
    let queued: Vec<&String> = listing
        .iter()
        .filter(|l| field(l, "state").as_deref() == Some("queued"))
        .collect();
    assert_eq!(queued.len(), 1, "{listing:?}");
    assert_eq!(field(queued[0], "instance"), None, "{listing:?}");
    drop((holders, fourth));
}

#[test]
fn conns_names_the_instance_each_holder_holds() {
    let dir = TempDir::new("pool-conns");
    let (proxy, sock, _ups) = pool(&dir, &[]);
    let holders: Vec<_> = (0..2).map(|_| holding(&proxy)).collect();
    let listing = ctl_ok(&sock, &["conns"]);
    let mut instances: Vec<Option<String>> = listing.iter().map(|l| field(l, "instance")).collect();
    instances.sort();
    assert_eq!(
        instances,
        [Some("1".to_string()), Some("2".to_string())],
        "{listing:?}"
    );
    drop(holders);
}

#[test]
fn position_counts_the_eta_in_rounds_of_the_whole_pool() {
    let dir = TempDir::new("pool-position");
    let (proxy, sock, _ups) = pool(&dir, &[]);
    // One connection proxies for at least 200 ms: the average the ETA is
    // made of.
    let first = holding(&proxy);
    std::thread::sleep(Duration::from_millis(200));
    finish(first);
    proxy.expect_log(closed_with(1, "ok"), "conn 1 closed");
    let holders: Vec<_> = (0..2).map(|_| holding(&proxy)).collect();
    let waiting: Vec<_> = (0..3).map(|_| proxy.connect()).collect();
    assert!(
        wait_until(WAIT, || num_field(&status(&sock).0, "queued") == 3),
        "{:?}",
        status(&sock)
    );
    let eta = |client: &std::net::TcpStream| {
        let addr = client.local_addr().expect("local address").to_string();
        let lines = ctl_ok(&sock, &["position", &addr]);
        assert_eq!(num_field(&lines[0], "free_permits"), 0, "{lines:?}");
        num_field(&lines[0], "eta_ms")
    };
    let etas: Vec<u64> = waiting.iter().map(eta).collect();
    // Two instances of one permit: the first two wait one round, the
    // third two rounds.
    assert!(etas[0] >= 200, "{etas:?}");
    assert_eq!(etas[1], etas[0], "{etas:?}");
    assert_eq!(etas[2], 2 * etas[0], "{etas:?}");
    drop(holders);
}

#[test]
fn restart_names_an_instance_of_the_pool() {
    let dir = TempDir::new("pool-restart-unsupervised");
    let (_proxy, sock, _ups) = pool(&dir, &[]);
    assert_eq!(ctl_err(&sock, &["restart", "3"]), "no instance 3");
    assert_eq!(ctl_err(&sock, &["restart", "2"]), "restart needs --spawn");
    assert_eq!(ctl_err(&sock, &["restart"]), "restart needs --spawn");
}

#[test]
fn the_state_dump_counts_the_instances() {
    let dir = TempDir::new("pool-dump");
    let (proxy, _sock, _ups) = pool(&dir, &[]);
    proxy.signal("USR1");
    let summary = proxy.expect_log(event("state_summary"), "state_summary");
    assert_eq!(num_field(&summary, "instances"), 2, "{summary}");
}

const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, s.value))
"#;

/// Samples by `name{label="v",...}` (labels sorted; `name{}` without any),
/// as `prometheus_client` parses the exposition.
fn parse(python: &str, text: &str) -> HashMap<String, f64> {
    run_parser(python, PARSE, text)
        .lines()
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            (name.to_owned(), value.parse().expect("sample value"))
        })
        .collect()
}

/// `promtool check metrics` (Debian's `prometheus` package) on `text`:
/// the exposition must parse and pass its lint without a word. Skipped
/// with the reason printed when promtool is missing (a failure under CI,
/// whose `.ci/run` installs it).
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is missing ({e}), and .ci/run installs it"
            );
            eprintln!("skipped: promtool (Debian's prometheus) not found: {e}");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

/// One scrape of `/metrics` at `addr`.
fn scrape(addr: &str) -> String {
    let mut s = connect(addr.parse().expect("metrics address"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("request");
    let raw = read_to_eof(&mut s).expect("response");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[test]
fn metrics_have_every_instances_series() {
    let Some(python) = prometheus_parser() else {
        return;
    };
    let dir = TempDir::new("pool-metrics");
    let (proxy, _sock, _ups) = pool(&dir, &["--metrics", "127.0.0.1:0"]);
    let line = proxy.expect_log(event("metrics_listening"), "metrics_listening");
    let addr = field(&line, "addr").expect("addr=");
    let holders: Vec<_> = (0..2).map(|_| holding(&proxy)).collect();
    let text = scrape(&addr);
    promtool_check(&text);
    let samples = parse(python, &text);
    let get = |name: &str| {
        *samples
            .get(name)
            .unwrap_or_else(|| panic!("no sample {name}; have {:?}", samples.keys()))
    };
    assert_eq!(get("tcplock_permits{}"), 2.0);
    assert_eq!(get("tcplock_active_connections{}"), 2.0);
    for i in ["1", "2"] {
        let at = |name: &str| format!("{name}{{instance=\"{i}\"}}");
        assert_eq!(get(&at("tcplock_upstream_up")), 1.0, "instance {i}");
        assert_eq!(get(&at("tcplock_upstream_generation")), 0.0);
        assert_eq!(
            get(&format!(
                "tcplock_upstream_state{{instance=\"{i}\",state=\"ready\"}}"
            )),
            1.0
        );
        // The two holders went to different instances (idle longest first).
        assert_eq!(get(&at("tcplock_instance_active")), 1.0, "instance {i}");
        assert_eq!(get(&at("tcplock_instance_activations_total")), 1.0);
        assert_eq!(get(&at("tcplock_instance_cooling_down")), 0.0);
    }
    drop(holders);
}

/// A pool of two stand-in offices, each spawned with its own port and its
/// own state directory (`$TCPLOCK_INSTANCE`).
fn office_pool(office: &Office, sock: &Path, more: &[&str]) -> Proxy {
    let (p1, p2) = (unused_port(), unused_port());
    let list = format!("127.0.0.1:{p1},127.0.0.1:{p2}");
    let base = office.dir().display().to_string();
    let spawn = format!(
        "mkdir -p {base}/$TCPLOCK_INSTANCE && exec python3 {SCRIPT} --state {base}/$TCPLOCK_INSTANCE"
    );
    let sock = sock.to_str().expect("utf-8 path");
    let mut args = vec!["-u", &list, "--spawn", &spawn, "--control", sock];
    args.extend_from_slice(more);
    Proxy::start(&args)
}

/// Waits until every instance line of `status` is ready at `gens`.
fn wait_ready(sock: &Path, gens: [u64; 2]) -> Vec<String> {
    let deadline = Instant::now() + START_WAIT;
    loop {
        let (_, lines) = status(sock);
        let now: Vec<(Option<String>, u64)> = lines
            .iter()
            .map(|l| (field(l, "state"), num_field(l, "gen")))
            .collect();
        let want: Vec<(Option<String>, u64)> =
            gens.iter().map(|g| (Some("ready".into()), *g)).collect();
        if now == want {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "never ready at {gens:?}: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn restart_2_restarts_only_instance_2_and_all_restarts_both() {
    let office = Office::new("pool-restart");
    let dir = TempDir::new("pool-restart");
    let sock = dir.join("ctl.sock");
    let mut proxy = office_pool(&office, &sock, &["--metrics", "127.0.0.1:0"]);
    let before = wait_ready(&sock, [1, 1]);
    assert!(
        before
            .iter()
            .all(|l| field(l, "supervised").as_deref() == Some("yes"))
    );
    let pid_1 = num_field(&before[0], "pid");
    let reply = ctl_ok(&sock, &["restart", "2"]);
    assert_eq!(reply.len(), 1, "{reply:?}");
    assert_eq!(num_field(&reply[0], "instance"), 2, "{reply:?}");
    assert_eq!(num_field(&reply[0], "gen"), 2, "{reply:?}");
    let after = wait_ready(&sock, [1, 2]);
    assert_eq!(num_field(&after[0], "pid"), pid_1, "instance 1 untouched");
    assert_eq!(num_field(&after[0], "restarts"), 0, "{after:?}");
    assert_eq!(num_field(&after[1], "restarts"), 1, "{after:?}");
    assert_eq!(num_field(&after[1], "pid"), num_field(&reply[0], "pid"));
    assert_eq!(ctl_err(&sock, &["restart", "3"]), "no instance 3");
    // `restart` (all): rolling, answered once both are ready again.
    let reply = ctl_ok(&sock, &["restart"]);
    let gens: Vec<(u64, u64)> = reply
        .iter()
        .map(|l| (num_field(l, "instance"), num_field(l, "gen")))
        .collect();
    assert_eq!(gens, [(1, 2), (2, 3)], "{reply:?}");
    wait_ready(&sock, [2, 3]);
    // The metrics show each instance's generation and restarts.
    let line = proxy.expect_log(event("metrics_listening"), "metrics_listening");
    let text = scrape(&field(&line, "addr").expect("addr="));
    for expected in [
        "tcplock_upstream_generation{instance=\"1\"} 2",
        "tcplock_upstream_generation{instance=\"2\"} 3",
        "tcplock_upstream_restarts_total{instance=\"1\",reason=\"control\"} 1",
        "tcplock_upstream_restarts_total{instance=\"2\",reason=\"control\"} 2",
        "tcplock_upstream_up{instance=\"1\"} 1",
        "tcplock_upstream_up{instance=\"2\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "no {expected} in\n{text}"
        );
    }
    promtool_check(&text);
    // Stopped as a service manager would, tcplock stops both offices; a
    // killed one would leave their forked servers behind.
    let status = proxy.stop(START_WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}
