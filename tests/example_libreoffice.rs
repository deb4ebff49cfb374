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
    assert_field(&due, "reason", "timeout");
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
    let Some(python) = real_office_python() else {
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
    let source = work.join("letter.txt");
    write_document(&source, 400);

    let mut rss_by_gen: BTreeMap<u64, u64> = BTreeMap::new();
    let started = Instant::now();
    for n in 0..conversions {
        let out = work.join(format!("out-{n}.pdf"));
        if let Err(e) = convert(&python, proxy.port(), &source, &out) {
            panic!("conversion {n}: {e}");
        }
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

/// A python3 that can drive a real LibreOffice (`soffice` on PATH, `uno`
/// importable), or `None` after printing why the test is skipped.
fn real_office_python() -> Option<String> {
    if !on_path("soffice") {
        eprintln!(
            "skipped: no soffice on PATH (apt-get install libreoffice-writer-nogui python3-uno)"
        );
        return None;
    }
    let python = python_with_uno();
    if python.is_none() {
        eprintln!("skipped: no python3 can import uno (apt-get install python3-uno)");
    }
    python
}

/// A plain-text document of `paragraphs` numbered paragraphs at `path`.
fn write_document(path: &Path, paragraphs: u64) {
    let body: String = (0..paragraphs)
        .map(|i| format!("Paragraph {i}: the quick brown fox jumps over the lazy dog.\n"))
        .collect();
    std::fs::write(path, body).expect("write the document");
}

/// `k` consecutive ports on 127.0.0.1 with nothing listening on them, as
/// `(first, last)`.
fn free_port_range(k: u16) -> (u16, u16) {
    for _ in 0..200 {
        let first = unused_port();
        let Some(last) = first.checked_add(k - 1) else {
            continue;
        };
        if (first..=last).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return (first, last);
        }
    }
    panic!("no {k} consecutive free ports in 200 tries");
}

/// `event=EV instance=I`.
fn inst_event(ev: &'static str, instance: u64) -> impl Fn(&str) -> bool + Clone {
    move |l: &str| is_event(l, ev) && field(l, "instance") == Some(instance.to_string())
}

/// The first field of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One conversion through `port` by `uno_convert.py`, cut after 120 s.
fn convert(python: &str, port: u16, source: &Path, out: &Path) -> Result<(), String> {
    let converter = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/uno_convert.py");
    let mut child = Command::new(python)
        .arg(converter)
        .arg(port.to_string())
        .arg(source)
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run uno_convert.py: {e}"))?;
    let mut status = None;
    wait_until(Duration::from_secs(120), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("did not finish within 120 s".to_string());
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    if !status.success() {
        return Err(format!("failed ({status}): {err}"));
    }
    let pdf = std::fs::read(out).map_err(|e| format!("{}: {e}", out.display()))?;
    if !pdf.starts_with(b"%PDF") {
        return Err(format!("{} is not a PDF", out.display()));
    }
    Ok(())
}

/// The README's pool of offices, for real: K LibreOffices on a port range
/// (`-u 127.0.0.1:FIRST-LAST`), each with its own profile picked by
/// `$TCPLOCK_INSTANCE`, spawned with the README's command through
/// `/bin/sh -c`, behind one queue; C client threads convert until N
/// conversions are done. `TCPLOCK_LO_POOL` (K, default 2),
/// `TCPLOCK_LO_CLIENTS` (C, default K), `TCPLOCK_LO_CONVERSIONS` (N,
/// default 16), `TCPLOCK_LO_RESTART_AFTER` (default 4) and
/// `TCPLOCK_LO_PARAGRAPHS` (the document's size, default 400) scale it; it
/// prints conversions, wall time, conversions/s, restarts and peak RSS per
/// instance.
#[test]
fn a_real_libreoffice_pool_converts_in_parallel() {
    let Some(python) = real_office_python() else {
        return;
    };
    let k = env_number("TCPLOCK_LO_POOL", 2).clamp(1, 16);
    let clients = env_number("TCPLOCK_LO_CLIENTS", k).max(1);
    let conversions = env_number("TCPLOCK_LO_CONVERSIONS", 16);
    let restart_after = env_number("TCPLOCK_LO_RESTART_AFTER", 4).max(1);
    let paragraphs = env_number("TCPLOCK_LO_PARAGRAPHS", 400);

    let work = scratch_dir("real-office-pool");
    let _reaper = OfficeReaper(work.display().to_string());
    let (first, last) = free_port_range(k as u16);
    // The README's spawn line, with the scratch directory for /tmp.
    let spawn = format!(
        "exec soffice -env:UserInstallation=file://{}/office-$TCPLOCK_INSTANCE \
         --headless --invisible --nologo --norestore \
         --accept=\"socket,host=127.0.0.1,port=$TCPLOCK_UPSTREAM_PORT;urp;\"",
        work.display()
    );
    let conf = example("tcplock.conf");
    let upstream = format!("127.0.0.1:{first}-{last}");
    let restart_after_arg = restart_after.to_string();
    let mut proxy = Proxy::start(&[
        "-c",
        &conf.to_string_lossy(),
        "-u",
        &upstream,
        "--spawn",
        &spawn,
        "--restart-after",
        &restart_after_arg,
    ]);
    // The first start of each office makes its profile: the clock starts
    // once every office answers.
    let booting = Instant::now();
    for i in 1..=k {
        assert!(
            proxy
                .wait_for_log(inst_event("upstream_ready", i), Duration::from_secs(120))
                .is_some(),
            "office {i} not ready within 120 s"
        );
    }
    let boot = booting.elapsed();
    let source = work.join("letter.txt");
    write_document(&source, paragraphs);

    // C threads take conversion numbers until N are taken; the main thread
    // samples each instance's office's memory meanwhile.
    let next = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut peak_rss: BTreeMap<u64, u64> = BTreeMap::new();
    let port = proxy.port();
    let started = Instant::now();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (python, source, work, next, done) = (&python, &source, &work, &next, &done);
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n >= conversions {
                            break;
                        }
                        // A document of its own: an office opening a file
                        // locks it (`.~lock.NAME#`), and another office then
                        // refuses to load it.
                        let input = work.join(format!("in-{n}.txt"));
                        let out = work.join(format!("out-{n}.pdf"));
                        let copied = std::fs::copy(source, &input).map_err(|e| e.to_string());
                        if let Err(e) = copied.and_then(|_| convert(python, port, &input, &out)) {
                            failures.push(format!("conversion {n}: {e}"));
                        }
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    failures
                })
            })
            .collect();
        // Every worker ends: each conversion is cut after 120 s.
        while done.load(std::sync::atomic::Ordering::SeqCst) < clients as usize {
            for i in 1..=k {
                let leader = proxy
                    .matching(inst_event("upstream_starting", i))
                    .last()
                    .map(|l| num_field(l, "pid") as u32);
                if let Some(leader) = leader {
                    let peak = peak_rss.entry(i).or_default();
                    *peak = (*peak).max(session_rss_kib(leader));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a client thread panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    assert!(failures.is_empty(), "{failures:#?}");

    let served: BTreeMap<u64, usize> = (1..=k)
        .map(|i| (i, proxy.count_logs(inst_event("activated", i))))
        .collect();
    // An office that converted restart-after documents became due; one due
    // while another was out kept serving until its turn. Each gets its
    // turn once the pool is idle: a new generation answers.
    for (&i, &n) in &served {
        if n as u64 >= restart_after {
            assert!(
                wait_until(Duration::from_secs(120), || {
                    proxy.count_logs(move |l: &str| {
                        inst_event("upstream_ready", i)(l) && num_field(l, "gen") >= 2
                    }) > 0
                }),
                "office {i} converted {n} documents and was never restarted"
            );
        }
    }
    let restarts: BTreeMap<u64, usize> = (1..=k)
        .map(|i| (i, proxy.count_logs(inst_event("upstream_stopping", i))))
        .collect();
    eprintln!(
        "real LibreOffice pool: K={k} offices, C={clients} clients, {conversions} conversions \
         of {paragraphs} paragraphs in {:.1} s = {:.2} conversions/s (offices up in {:.1} s; restart-after \
         {restart_after}); conversions per instance {served:?}; restarts per instance \
         {restarts:?}; peak office RSS per instance (KiB) {peak_rss:?}; load average {}",
        elapsed.as_secs_f64(),
        conversions as f64 / elapsed.as_secs_f64(),
        boot.as_secs_f64(),
        load_average(),
    );

    assert!(
        proxy.wait_for_count(outcome("ok"), conversions as usize, WAIT),
        "not every conversion was logged as ok"
    );
    assert_eq!(proxy.count_logs(outcome("ok")) as u64, conversions);
    assert_eq!(proxy.count_logs(event("closed")) as u64, conversions);
    assert_eq!(proxy.count_logs(event("upstream_start_failed")), 0);
    assert_eq!(proxy.count_logs(event("connect_failed")), 0);
    // Every office converted: the queue spreads over the pool.
    if conversions >= k {
        for (i, n) in &served {
            assert!(*n > 0, "office {i} converted nothing: {served:?}");
        }
    }
    // With more conversions than the pool takes before a restart, some
    // office became due and restarted (once its turn came).
    if conversions >= k * restart_after {
        assert!(restarts.values().sum::<usize>() > 0, "no office restarted");
    }

    // Rolling: an office is out from `upstream_stopping` to its next
    // `upstream_ready`; never two at once, and only planned restarts.
    let mut out = std::collections::BTreeSet::new();
    for line in proxy.logs() {
        if is_event(&line, "upstream_stopping") {
            assert_field(&line, "reason", "after_n");
            out.insert(num_field(&line, "instance"));
            assert!(
                out.len() <= 1,
                "two offices out at once ({out:?}) at: {line}"
            );
        } else if is_event(&line, "upstream_ready") {
            out.remove(&num_field(&line, "instance"));
        } else if is_event(&line, "upstream_exited") {
            assert_field(&line, "expected", "true");
        }
    }
    // Each office's generations follow one another.
    for i in 1..=k {
        let gens: Vec<u64> = proxy
            .matching(inst_event("upstream_starting", i))
            .iter()
            .map(|l| num_field(l, "gen"))
            .collect();
        let want: Vec<u64> = (1..=gens.len() as u64).collect();
        assert_eq!(gens, want, "office {i}'s generations");
    }

    let leaders: Vec<u32> = starts(&proxy).iter().map(|&(_, pid)| pid).collect();
    assert!(leaders.len() >= k as usize);
    let status = proxy.stop(Duration::from_secs(60)).expect("tcplock exits");
    assert!(status.success(), "{status:?}");
    for leader in leaders {
        assert!(
            session_members(leader).is_empty(),
            "office processes of session {leader} left after tcplock exited"
        );
    }
}
