//! A supervised pool (`--spawn` with several instances), end to end against
//! the stand-in office (`tests/office_standin.py`): each instance is its own
//! child with its own port, `TCPLOCK_INSTANCE`, generation and restarts.
//! Each instance's office keeps its state (events, lock, `fail` switch) in
//! its own directory, `POOL/I`, named by the `TCPLOCK_INSTANCE` it was
//! spawned with, so its lock never clashes with another instance's.
mod common;
mod officekit;

use common::*;
use officekit::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Instant;

/// Instance numbers a pool's directory has an office for: a reload's
/// added instances take numbers past the configured count.
const OFFICES: u32 = 6;

/// A pool of stand-in offices, one directory per instance number.
struct Pool {
    dir: PathBuf,
    offices: Vec<Office>,
}

impl Pool {
    fn new(tag: &str) -> Pool {
        let dir = scratch_dir(tag);
        let offices = (1..=OFFICES)
            .map(|i| Office::at(dir.join(i.to_string())))
            .collect();
        Pool { dir, offices }
    }

    /// The office of instance `instance`.
    fn office(&self, instance: u32) -> &Office {
        &self.offices[instance as usize - 1]
    }

    /// The `--spawn` command every instance shares: its state directory
    /// is picked by the instance number tcplock gives it.
    fn command(&self, extra: &str) -> String {
        format!(
            "exec python3 {SCRIPT} --state {}/$TCPLOCK_INSTANCE {extra}",
            self.dir.display()
        )
    }

    /// Starts tcplock in front of one instance per port.
    fn start(&self, ports: &[u16], extra: &str, more: &[&str]) -> Proxy {
        let upstream = upstream_list(ports);
        let command = self.command(extra);
        let mut args = vec!["-u", upstream.as_str(), "--spawn", command.as_str()];
        args.extend_from_slice(more);
        Proxy::start(&args)
    }

    /// Writes the pool's config file: one instance per port, spawned with
    /// [`Pool::command`]. Returns its path.
    fn write_conf(&self, ports: &[u16]) -> PathBuf {
        let path = self.dir.join("tcplock.conf");
        let text = format!(
            "listen = 127.0.0.1:0\nupstream = {}\nspawn = {}\n",
            upstream_list(ports),
            self.command("")
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// No instance ever started beside a live one of itself.
    fn assert_never_two(&self) {
        for office in &self.offices {
            office.assert_never_two();
        }
    }
}

/// `127.0.0.1:P1,127.0.0.1:P2,...`
fn upstream_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `n` distinct free ports.
fn ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let port = unused_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// `event=EV instance=I`.
fn inst_event(ev: &'static str, instance: u32) -> impl Fn(&str) -> bool + Clone {
    move |l: &str| is_event(l, ev) && field(l, "instance") == Some(instance.to_string())
}

fn instance_of(line: &str) -> u32 {
    num_field(line, "instance") as u32
}

/// Waits until every instance of `1..=k` logged `upstream_ready`.
fn all_ready(proxy: &Proxy, k: u32) {
    for i in 1..=k {
        assert!(
            proxy
                .wait_for_log(inst_event("upstream_ready", i), START_WAIT)
                .is_some(),
            "instance {i} not ready within {START_WAIT:?}"
        );
    }
}

/// `(gen, pid)` of every `upstream_starting` line of `instance`, in order.
fn starts_of(proxy: &Proxy, instance: u32) -> Vec<(u64, u32)> {
    proxy
        .matching(inst_event("upstream_starting", instance))
        .iter()
        .map(|l| (num_field(l, "gen"), num_field(l, "pid") as u32))
        .collect()
}

/// One client through `proxy`: asks who serves it, ends cleanly. Returns
/// the instance it was activated on, after checking that the office that
/// answered its `WHO` was spawned as that instance (`inst=`): the client
/// reached the instance tcplock chose for it.
fn serve_one(proxy: &Proxy) -> u32 {
    // Its activation comes after this; a client port may be reused, so
    // an earlier client's line with the same address is told apart by its
    // place and its instance.
    let from = proxy.logs().len();
    let mut client = proxy.connect();
    let me = client.local_addr().expect("local addr").to_string();
    client.write_all(b"WHO\n").expect("write WHO");
    let line = answer_line(&mut client);
    finish(client);
    let answered: u32 = field(&line, "inst")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no instance number in {line:?}"));
    let mine = |l: &String| is_event(l, "activated") && field(l, "client").as_deref() == Some(&me);
    let found = wait_until(WAIT, || {
        proxy.logs()[from..]
            .iter()
            .any(|l| mine(l) && instance_of(l) == answered)
    });
    assert!(
        found,
        "client {me} answered by instance {answered}, activated as: {:#?}",
        proxy.logs()[from..]
            .iter()
            .filter(|l| mine(l))
            .collect::<Vec<_>>()
    );
    answered
}

/// `clients` clients on `threads` threads at once, each served in full by
/// the instance it was activated on; returns those instances.
fn stream_of_clients(proxy: &Proxy, threads: usize, clients: usize) -> Vec<u32> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (0..clients)
                        .filter(|n| n % threads == t)
                        .map(|_| serve_one(proxy))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a client thread failed"))
            .collect()
    })
}

/// Every process of every session tcplock started is gone.
fn assert_sessions_gone(leaders: &[u32]) {
    for &leader in leaders {
        assert!(
            wait_until(WAIT, || session_members(leader).is_empty()),
            "processes of session {leader} left: {:?}",
            session_members(leader)
        );
    }
}

/// Every `upstream_starting` pid logged so far.
fn all_leaders(proxy: &Proxy) -> Vec<u32> {
    proxy
        .matching(event("upstream_starting"))
        .iter()
        .map(|l| num_field(l, "pid") as u32)
        .collect()
}

/// Stops tcplock with SIGTERM: exit 0, and nothing of any instance's
/// sessions left.
fn stop_clean(mut proxy: Proxy, pool: &Pool) {
    let leaders = all_leaders(&proxy);
    let status = proxy.stop(START_WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "tcplock exit status {status:?}");
    assert_sessions_gone(&leaders);
    pool.assert_never_two();
}

#[test]
fn restart_after_rolls_through_the_pool_one_instance_at_a_time() {
    const K: u32 = 3;
    let pool = Pool::new("rolling");
    let proxy = pool.start(&ports(K as usize), "", &["--restart-after", "2"]);
    all_ready(&proxy, K);

    // A stream of clients, two per instance at once and round after round
    // with no pause, until every instance restarted by policy at least
    // once: the turn goes to the instance due longest, so none is starved.
    let mut served = Vec::new();
    let restarted = |proxy: &Proxy| {
        (1..=K).all(|i| {
            proxy.count_logs(move |l: &str| {
                inst_event("upstream_ready", i)(l) && num_field(l, "gen") >= 2
            }) > 0
        })
    };
    let deadline = Instant::now() + 2 * START_WAIT;
    while !restarted(&proxy) && Instant::now() < deadline {
        served.extend(stream_of_clients(&proxy, K as usize, 2 * K as usize));
    }
    assert!(
        restarted(&proxy),
        "not every instance restarted after {} clients",
        served.len()
    );
    assert!(
        proxy.wait_for_count(outcome("ok"), served.len(), WAIT),
        "every client ends ok"
    );
    assert_eq!(proxy.count_logs(event("connect_failed")), 0);
    assert_eq!(proxy.count_logs(event("rejected")), 0);
    assert_eq!(
        proxy.count_logs(event("closed")),
        served.len(),
        "a client ended otherwise"
    );
    for instance in &served {
        assert!((1..=K).contains(instance), "{served:?}");
    }

    // The timeline: an instance is out from `upstream_stopping` to its
    // next `upstream_ready`. Never two out at once, never all of them.
    let mut out = BTreeSet::new();
    let mut stops = 0;
    for line in proxy.logs() {
        if is_event(&line, "upstream_stopping") {
            assert_field(&line, "reason", "after_n");
            out.insert(instance_of(&line));
            stops += 1;
            assert!(
                out.len() <= 1,
                "two instances out at once ({out:?}) at: {line}\n{:#?}",
                proxy.logs()
            );
        } else if is_event(&line, "upstream_ready") {
            out.remove(&instance_of(&line));
        }
        assert!(out.len() < K as usize, "every instance out at: {line}");
    }
    assert!(stops >= K as usize, "{stops} planned stops");
    // Each restart was counted on its own instance: no generation of
    // one instance was started beside a live one of it.
    for i in 1..=K {
        let gens: Vec<u64> = starts_of(&proxy, i).iter().map(|s| s.0).collect();
        let want: Vec<u64> = (1..=gens.len() as u64).collect();
        assert_eq!(gens, want, "instance {i}'s generations");
        let first = pool.office(i).of_gen("wrapper_start", 1).expect("gen 1");
        assert_eq!(field(&first, "inst"), Some(i.to_string()), "{first}");
    }
    stop_clean(proxy, &pool);
}

#[test]
fn a_crashed_instance_restarts_alone_while_the_others_serve() {
    const K: u32 = 3;
    let pool = Pool::new("crash");
    let ports = ports(K as usize);
    let proxy = pool.start(&ports, "--startup-delay 2", &[]);
    all_ready(&proxy, K);
    let before: Vec<Vec<(u64, u32)>> = (1..=K).map(|i| starts_of(&proxy, i)).collect();
    let (_, pid) = before[1][0];
    assert_eq!(pid, pool.office(2).wrapper_pid(1));
    // Each instance was spawned for its own port.
    for i in 1..=K {
        let listening = pool.office(i).of_gen("listening", 1).expect("listened");
        assert_eq!(
            num_field(&listening, "port"),
            u64::from(ports[i as usize - 1])
        );
    }

    kill("KILL", pid);
    let exited = proxy.expect_log(inst_event("upstream_exited", 2), "instance 2's exit");
    assert_eq!(num_field(&exited, "pid"), u64::from(pid), "{exited}");
    // Instance 2's next generation takes two seconds to listen: the clients
    // now are served by the others, none fails.
    let served = stream_of_clients(&proxy, 2, 6);
    let restart = proxy.expect_log(
        |l: &str| inst_event("upstream_starting", 2)(l) && num_field(l, "gen") == 2,
        "instance 2 restarts",
    );
    assert_eq!(field(&restart, "reason").as_deref(), Some("crash"));
    assert!(
        proxy
            .wait_for_log(
                |l: &str| inst_event("upstream_ready", 2)(l) && num_field(l, "gen") == 2,
                START_WAIT
            )
            .is_some(),
        "instance 2 ready again"
    );
    assert!(
        proxy.wait_for_count(outcome("ok"), served.len(), WAIT),
        "every client ends ok"
    );
    assert_eq!(proxy.count_logs(event("connect_failed")), 0);
    // While instance 2 was down, clients went to the others only.
    let logs = proxy.logs();
    let down_from = logs
        .iter()
        .position(|l| inst_event("upstream_exited", 2)(l))
        .expect("exit line");
    let down_to = logs
        .iter()
        .position(|l| inst_event("upstream_ready", 2)(l) && num_field(l, "gen") == 2)
        .expect("ready line");
    let meanwhile: Vec<&String> = logs[down_from..down_to]
        .iter()
        .filter(|l| is_event(l, "activated"))
        .collect();
    assert!(
        meanwhile.iter().all(|l| instance_of(l) != 2),
        "a client activated on the down instance: {meanwhile:#?}"
    );
    assert!(
        !meanwhile.is_empty(),
        "no client was served while instance 2 restarted"
    );
    // The others were left alone: same pid, same generation.
    for i in [1, 3] {
        assert_eq!(
            starts_of(&proxy, i),
            before[i as usize - 1],
            "instance {i} was restarted too"
        );
        assert!(alive(before[i as usize - 1][0].1), "instance {i} died");
    }
    stop_clean(proxy, &pool);
}

#[test]
fn an_instance_that_cannot_start_is_skipped_and_clients_still_served() {
    const K: u32 = 3;
    let pool = Pool::new("nostart");
    pool.office(2).set_failing(true);
    let proxy = pool.start(&ports(K as usize), "", &["--start-retries", "2"]);
    let failed = proxy
        .wait_for_log(inst_event("upstream_failed", 2), START_WAIT)
        .expect("instance 2 failed");
    assert_eq!(num_field(&failed, "starts"), 2, "{failed}");
    for i in [1, 3] {
        assert!(
            proxy
                .wait_for_log(inst_event("upstream_ready", i), START_WAIT)
                .is_some(),
            "instance {i} ready"
        );
    }
    let served = stream_of_clients(&proxy, 3, 9);
    assert!(
        proxy.wait_for_count(outcome("ok"), served.len(), WAIT),
        "every client ends ok"
    );
    assert_eq!(proxy.count_logs(event("rejected")), 0);
    assert_eq!(proxy.count_logs(event("connect_failed")), 0);
    assert!(
        served.iter().all(|&instance| instance != 2),
        "a client went to the failed instance: {served:#?}"
    );
    // The others never restarted; instance 2's office saw only failed starts.
    for i in [1, 3] {
        assert_eq!(starts_of(&proxy, i).len(), 1, "instance {i}");
    }
    assert_eq!(pool.office(2).count("fail_start"), 2);
    assert_eq!(pool.office(2).count("server_start"), 0);
    stop_clean(proxy, &pool);
}

#[test]
fn a_reload_adds_and_removes_instances_and_leaves_the_rest_alone() {
    let pool = Pool::new("reload");
    let ports = ports(4);
    let conf_path = pool.write_conf(&ports[..3]);
    let proxy = Proxy::start_raw(&["-c", conf_path.to_str().unwrap()]);
    all_ready(&proxy, 3);
    let kept: Vec<(u32, Vec<(u64, u32)>)> =
        [1, 3].iter().map(|&i| (i, starts_of(&proxy, i))).collect();
    let removed_leader = starts_of(&proxy, 2)[0].1;
    let removed_server = pool.office(2).server_pid(1);

    // One client on each instance, held: instance 2 drains only once its
    // client is done.
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut client = proxy.connect();
        roundtrip(&mut client, b"holding\n");
        holders.push(client);
    }
    let on = |client: &TcpStream| {
        let me = client.local_addr().unwrap().to_string();
        instance_of(&proxy.expect_log(
            move |l: &str| is_event(l, "activated") && field(l, "client").as_deref() == Some(&me),
            "a holder's activation",
        ))
    };
    let holder_of_2 = holders
        .iter()
        .position(|c| on(c) == 2)
        .expect("a holder on instance 2");

    // Instance 2 (ports[1]) goes, ports[3] comes.
    pool.write_conf(&[ports[0], ports[2], ports[3]]);
    proxy.signal("HUP");
    proxy.expect_log(event("reloaded"), "the reload");
    let added_start = proxy
        .wait_for_log(
            |l: &str| is_event(l, "upstream_starting") && ![1, 2, 3].contains(&instance_of(l)),
            START_WAIT,
        )
        .expect("the added instance starts");
    let added = instance_of(&added_start);
    assert!(
        proxy
            .wait_for_log(inst_event("upstream_ready", added), START_WAIT)
            .is_some(),
        "the added instance is ready"
    );
    let listening = pool.office(added).of_gen("listening", 1).expect("listened");
    assert_eq!(num_field(&listening, "port"), u64::from(ports[3]));
    // Still draining: its client holds it.
    roundtrip(&mut holders[holder_of_2], b"instance 2 still serves\n");
    assert_eq!(proxy.count_logs(inst_event("upstream_stopping", 2)), 0);
    assert!(alive(removed_server), "the removed instance stopped early");

    // The added one serves new clients (the others are held).
    assert_eq!(serve_one(&proxy), added);

    // Its client done, the removed instance stops, for good.
    finish(holders.remove(holder_of_2));
    proxy.expect_log(inst_event("upstream_stopping", 2), "instance 2 stops");
    assert!(
        proxy
            .wait_for_log(inst_event("upstream_exited", 2), START_WAIT)
            .is_some(),
        "instance 2 exited"
    );
    assert_sessions_gone(&[removed_leader]);
    assert!(!alive(removed_server));
    // The unchanged ones: same pid, same generation, never due.
    for (i, before) in &kept {
        assert_eq!(&starts_of(&proxy, *i), before, "instance {i} was restarted");
        assert!(alive(before[0].1), "instance {i} died");
        assert_eq!(proxy.count_logs(inst_event("restart_due", *i)), 0);
    }
    for holder in holders {
        finish(holder);
    }
    assert_eq!(starts_of(&proxy, 2).len(), 1, "instance 2 started again");
    stop_clean(proxy, &pool);
}

#[test]
fn sigterm_stops_every_instance() {
    const K: u32 = 3;
    let pool = Pool::new("term");
    // Servers that take their time to end on SIGTERM: tcplock waits for
    // every one of them.
    let mut proxy = pool.start(&ports(K as usize), "--term-delay 0.5", &[]);
    all_ready(&proxy, K);
    let servers: Vec<u32> = (1..=K).map(|i| pool.office(i).server_pid(1)).collect();
    let leaders = all_leaders(&proxy);
    assert_eq!(leaders.len(), K as usize);
    let status = proxy.stop(START_WAIT).expect("tcplock exits after SIGTERM");
    assert!(status.success(), "tcplock exit status {status:?}");
    for i in 1..=K {
        assert_eq!(
            proxy.count_logs(inst_event("upstream_stopping", i)),
            1,
            "instance {i} stopped once"
        );
        let term = pool.office(i).matching("term");
        assert!(
            term.iter()
                .any(|l| field(l, "who").as_deref() == Some("server")),
            "instance {i}'s server was not sent SIGTERM"
        );
    }
    for pid in servers {
        assert!(!alive(pid), "server {pid} outlived tcplock");
    }
    assert_sessions_gone(&leaders);
    pool.assert_never_two();
}

/// The stand-in's output comes out per instance: `instance=I` on each line.
#[test]
fn each_instance_output_is_logged_with_its_number() {
    const K: u32 = 2;
    let pool = Pool::new("output");
    let proxy = pool.start(&ports(K as usize), "--say hello-$TCPLOCK_INSTANCE", &[]);
    all_ready(&proxy, K);
    for i in 1..=K {
        let said = format!("hello-{i}");
        let line = proxy
            .wait_for_log(
                move |l: &str| is_event(l, "output") && field(l, "line").as_deref() == Some(&said),
                WAIT,
            )
            .unwrap_or_else(|| panic!("no output line of instance {i}"));
        assert_field(&line, "from", "upstream");
        assert_eq!(field(&line, "instance"), Some(i.to_string()), "{line}");
        assert_field(&line, "gen", "1");
    }
    stop_clean(proxy, &pool);
}

#[test]
fn a_reload_removing_an_instance_gives_back_its_output_pipes() {
    let pool = Pool::new("pipes");
    let ports = ports(2);
    let conf_path = pool.write_conf(&ports);
    let proxy = Proxy::start_raw(&["-c", conf_path.to_str().unwrap()]);
    all_ready(&proxy, 2);
    // No client, no hook: the pipes open are the two services' stdout and
    // stderr (both ends each) and whatever was open at start.
    let before = proxy.open_pipes();
    pool.write_conf(&ports[..1]);
    proxy.signal("HUP");
    proxy.expect_log(event("reloaded"), "the reload");
    assert!(
        proxy
            .wait_for_log(inst_event("upstream_exited", 2), START_WAIT)
            .is_some(),
        "instance 2 exited"
    );
    // Its stdout and stderr pipes, both ends: four descriptors back.
    assert!(
        wait_until(START_WAIT, || proxy.open_pipes() + 4 == before),
        "pipes open: {} before the reload, {} after",
        before,
        proxy.open_pipes()
    );
    // Instance 1 still serves, and its output still comes through.
    assert_eq!(serve_one(&proxy), 1);
    stop_clean(proxy, &pool);
}
