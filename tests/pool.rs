//! A pool of upstream instances behind one FIFO queue (issue 12), without
//! `--spawn`, end to end through the binary: each client goes to the
//! instance the core chose, several at once; FIFO holds across the pool;
//! the instance idle longest goes first; a failing on-activate hook on one
//! instance sends the client to another; hooks of different instances run
//! at once; a refusing instance cools down while the rest serve; a reload
//! adds and removes instances without touching the rest; permits are per
//! instance; an instance at tcplock's own address is refused at start.
mod common;
mod hookkit;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hookkit::*;

/// How long each stand-in instance takes before it answers a request: a
/// slow service, and loop timestamps that always move on between clients
/// (idle-longest selection compares them in milliseconds).
const SERVICE_TIME: Duration = Duration::from_millis(15);

/// `(instance number, first line)` of each connection, in arrival order.
type Arrivals = Arc<Mutex<Vec<(usize, String)>>>;

/// K stand-in instances on free 127.0.0.1 ports, numbered 1..K, recording
/// every connection's first line with the instance that got it in one
/// shared log, then echoing.
struct Pool {
    instances: Vec<Upstream>,
    arrivals: Arrivals,
}

impl Pool {
    fn new(k: usize) -> Pool {
        let arrivals = Arrivals::default();
        let instances = (1..=k)
            .map(|id| Upstream::spawn(recording_as(id, Arc::clone(&arrivals))))
            .collect();
        Pool {
            instances,
            arrivals,
        }
    }

    /// The `-u` list of every instance.
    fn arg(&self) -> String {
        list(self.instances.iter().map(Upstream::arg))
    }

    fn instance(&self, id: usize) -> &Upstream {
        &self.instances[id - 1]
    }

    fn arrivals(&self) -> Vec<(usize, String)> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Waits until `n` connections have arrived over the pool.
    fn wait_arrivals(&self, n: usize) -> bool {
        wait_until(WAIT, || self.arrivals.lock().unwrap().len() >= n)
    }

    /// The instance that got the connection whose first line is `line`.
    fn instance_of(&self, line: &str) -> Option<usize> {
        self.arrivals()
            .iter()
            .find(|(_, l)| l == line)
            .map(|(id, _)| *id)
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

/// A stand-in handler for instance `id`: reads the first line, records it,
/// takes [`SERVICE_TIME`], echoes it and then everything else to EOF.
fn recording_as(id: usize, arrivals: Arrivals) -> impl Fn(TcpStream, Active) + Send + Sync {
    move |mut s, active| {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\n") {
            match s.read(&mut byte) {
                Ok(1) => got.push(byte[0]),
                _ => {
                    active.stats().errors.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        let line = String::from_utf8_lossy(&got[..got.len() - 1]).into_owned();
        arrivals.lock().unwrap().push((id, line));
        // Deliberate slowness of the stand-in, not a wait for a condition.
        thread::sleep(SERVICE_TIME);
        if s.write_all(&got).is_err() {
            active.stats().errors.fetch_add(1, Ordering::SeqCst);
            return;
        }
        echo_handler(s, active);
    }
}

/// Connects a client and sends its tag line at once (it waits in the
/// kernel while the client is queued).
fn tagged(proxy: &Proxy, tag: &str) -> TcpStream {
    let mut s = proxy.connect();
    s.write_all(format!("{tag}\n").as_bytes())
        .expect("write the tag");
    s
}

/// Reads the echo of the tag: the client was served.
fn served(s: &mut TcpStream, tag: &str) {
    let echo = read_n(s, tag.len() + 1).expect("the tag's echo");
    assert_eq!(echo, format!("{tag}\n").as_bytes());
}

/// A client of the lock at `addr` whose tag went through and came back.
fn served_at(addr: std::net::SocketAddr, tag: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(format!("{tag}\n").as_bytes()).expect("write");
    served(&mut s, tag);
    s
}

/// Stops a lock run on `runner` and waits for `run()` to return.
fn stop(handle: &tcplock::Handle, runner: thread::JoinHandle<()>) {
    handle.stop();
    assert!(
        wait_until(WAIT, || runner.is_finished()),
        "run() did not return"
    );
    runner.join().expect("the loop thread did not panic");
}

/// One client start to end: its tag goes through and comes back.
fn one_client(proxy: &Proxy, tag: &str) {
    let mut s = tagged(proxy, tag);
    served(&mut s, tag);
    finish(s);
}

/// The start of an on-activate hook that succeeds only if the two
/// instances' runs overlap: each waits (bounded) for the other's to have
/// started.
const BOTH_AT_ONCE: &str = r#"touch "$D/started.$TCPLOCK_INSTANCE"
other=$((3 - TCPLOCK_INSTANCE))
i=0
while [ ! -e "$D/started.$other" ]; do
  i=$((i + 1))
  [ "$i" -le 200 ] || exit 1
  sleep 0.05
done"#;

/// A proxy over the two instances of `pool` with `hook` (starting with
/// [`BOTH_AT_ONCE`]) on activation, through which two clients are served
/// at once and closed ok with no failed hook.
fn serve_two_through_overlapping_hooks(pool: &Pool, hook: &str) -> Proxy {
    let proxy = Proxy::start(&["-u", &pool.arg(), "-n", "1", "--on-activate", hook]);
    let mut a = tagged(&proxy, "a");
    let mut b = tagged(&proxy, "b");
    served(&mut a, "a");
    served(&mut b, "b");
    finish(a);
    finish(b);
    assert!(proxy.wait_for_count(outcome("ok"), 2, WAIT));
    assert_eq!(proxy.count_logs(event("hook_failed")), 0);
    proxy
}

/// Serves one client tagged `tag` and waits for the `n`th `ok` close.
fn one_client_closed(proxy: &Proxy, tag: &str, n: usize) {
    one_client(proxy, tag);
    assert!(
        proxy.wait_for_count(outcome("ok"), n, WAIT),
        "{tag} not closed"
    );
}

/// `conn=` → `instance=` of every `activated` line, in log order.
fn activations(proxy: &Proxy) -> Vec<(u64, u64)> {
    proxy
        .matching(event("activated"))
        .iter()
        .map(|l| (num_field(l, "conn"), num_field(l, "instance")))
        .collect()
}

#[test]
fn three_instances_serve_three_clients_at_once_and_fifo_holds_across_the_pool() {
    let pool = Pool::new(3);
    let proxy = Proxy::start(&["-u", &pool.arg(), "-n", "1", "--log-level", "debug"]);

    // One after another, each once the proxy logged the one before, so
    // accept order is known: c1 is conn=1 ... c7 is conn=7.
    let mut clients = Vec::new();
    for i in 1..=7u64 {
        let s = tagged(&proxy, &format!("c{i}"));
        proxy.expect_log(conn_event("accepted", i), &format!("accepted conn={i}"));
        clients.push(s);
    }
    assert!(
        pool.wait_arrivals(3),
        "three not served: {:?}",
        pool.arrivals()
    );
    assert!(
        wait_until(WAIT, || pool.instances.iter().all(|u| u.current() == 1)),
        "not one client on each instance at once: {:?}",
        pool.arrivals()
    );
    let first: BTreeSet<(String, usize)> = pool
        .arrivals()
        .into_iter()
        .map(|(id, line)| (line, id))
        .collect();
    let tags: BTreeSet<&str> = first.iter().map(|(l, _)| l.as_str()).collect();
    let ids: BTreeSet<usize> = first.iter().map(|(_, id)| *id).collect();
    assert_eq!(tags, BTreeSet::from(["c1", "c2", "c3"]), "{first:?}");
    assert_eq!(ids, BTreeSet::from([1, 2, 3]), "{first:?}");
    assert_eq!(pool.arrivals().len(), 3, "a queued client got through");

    // Each release frees one instance, and the head of the line takes it.
    for i in 4..=7usize {
        let done = i - 3;
        let mut s = clients.remove(0);
        served(&mut s, &format!("c{done}"));
        let freed = pool.instance_of(&format!("c{done}")).expect("served");
        finish(s);
        assert!(
            pool.wait_arrivals(i),
            "c{i} not served: {:?}",
            pool.arrivals()
        );
        let arrivals = pool.arrivals();
        assert_eq!(arrivals.len(), i, "{arrivals:?}");
        assert_eq!(arrivals[i - 1], (freed, format!("c{i}")), "{arrivals:?}");
    }
    let order: Vec<u64> = activations(&proxy).iter().map(|(conn, _)| *conn).collect();
    assert_eq!(order, (1..=7).collect::<Vec<u64>>(), "activation order");
    assert_eq!(clients.len(), 3);
    for (i, mut s) in (5..=7).zip(clients) {
        served(&mut s, &format!("c{i}"));
        finish(s);
    }
    assert!(proxy.wait_for_count(outcome("ok"), 7, WAIT));
}

#[test]
fn sequential_clients_go_to_the_instance_idle_longest() {
    let pool = Pool::new(3);
    let proxy = Proxy::start(&["-u", &pool.arg(), "-n", "1"]);
    for i in 1..=6 {
        one_client(&proxy, &format!("s{i}"));
        assert!(
            proxy.wait_for_count(outcome("ok"), i, WAIT),
            "s{i} not closed"
        );
    }
    let ids: Vec<usize> = pool.arrivals().iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1, 2, 3, 1, 2, 3], "{:?}", pool.arrivals());
    let logged: Vec<u64> = activations(&proxy).iter().map(|(_, id)| *id).collect();
    assert_eq!(logged, [1, 2, 3, 1, 2, 3]);
}

#[test]
fn a_failing_hook_on_one_instance_moves_the_client_to_another() {
    let pool = Pool::new(3);
    let dir = TempDir::new("pool-hook");
    let hook = dir.script(
        "hook.sh",
        r#"echo "$TCPLOCK_CONN_ID $TCPLOCK_INSTANCE $TCPLOCK_UPSTREAM" >> "$D/runs"
[ "$TCPLOCK_INSTANCE" != 2 ]"#,
    );
    let proxy = Proxy::start(&["-u", &pool.arg(), "-n", "1", "--on-activate", &hook]);
    for i in 1..=3 {
        one_client(&proxy, &format!("h{i}"));
        assert!(
            proxy.wait_for_count(outcome("ok"), i, WAIT),
            "h{i} not closed"
        );
    }
    // h2 went to instance 2 (idle longest), whose hook failed; it then went
    // to the next free instance instead of waiting out the backoff.
    let failed = proxy.expect_log(event("hook_failed"), "instance 2's hook failed");
    assert_field(&failed, "conn", "2");
    assert_field(&failed, "instance", "2");
    assert_field(&failed, "retry_in_ms", "500");
    assert_eq!(pool.instance(2).accepted(), 0, "instance 2 got a client");
    assert_eq!(pool.instance_of("h2"), Some(3), "{:?}", pool.arrivals());
    assert!(activations(&proxy).contains(&(2, 3)));
    assert_eq!(proxy.count_logs(event("hook_failed")), 1);
    // Each run saw its instance's number and address.
    let runs = dir.lines("runs");
    let want_run = |conn: u64, id: usize| format!("{conn} {id} {}", pool.instance(id).arg());
    assert_eq!(runs[..2], [want_run(1, 1), want_run(2, 2)], "{runs:?}");
    assert!(runs.contains(&want_run(2, 3)), "{runs:?}");
}

#[test]
fn hooks_of_two_instances_run_at_the_same_time() {
    let pool = Pool::new(2);
    let dir = TempDir::new("pool-hooks-overlap");
    // Each run waits (bounded) for the other instance's run to have
    // started: it succeeds only if both run at once.
    let hook = dir.script("hook.sh", BOTH_AT_ONCE);
    let proxy = serve_two_through_overlapping_hooks(&pool, &hook);
    let started: BTreeSet<String> = proxy
        .matching(event("hook_started"))
        .iter()
        .filter_map(|l| field(l, "instance"))
        .collect();
    assert_eq!(started, BTreeSet::from(["1".into(), "2".into()]));
    let exited: BTreeSet<String> = proxy
        .matching(event("hook_exited"))
        .iter()
        .filter_map(|l| field(l, "instance"))
        .collect();
    assert_eq!(exited, started);
    assert_no_zombies(proxy.pid(), Duration::from_secs(2));
}

#[test]
fn a_refusing_instance_cools_down_with_the_default_connect_timeout() {
    refusing_instance_cools_down(&[]);
}

/// A connect that gets no answer (a black-holed instance) is given up when
/// `--connect-timeout` runs out: that instance cools down and the client is
/// served by the next one.
#[test]
fn a_connect_that_times_out_is_given_up_and_the_next_instance_serves() {
    let (hole, _filling) = black_hole();
    let pool = Pool::new(1);
    let hole_addr = hole.local_addr().expect("local_addr");
    let upstreams = format!("{hole_addr},{}", pool.instance(1).arg());
    let proxy = Proxy::start(&["-u", &upstreams, "--connect-timeout", "300ms"]);
    one_client(&proxy, "late");
    assert!(proxy.wait_for_count(outcome("ok"), 1, WAIT));
    let failed = proxy.expect_log(event("connect_failed"), "the black hole's connect fails");
    assert_field(&failed, "instance", "1");
    let cooldown = proxy.expect_log(event("instance_cooldown"), "instance 1 cools down");
    assert_field(&cooldown, "instance", "1");
    let served_by: Vec<u64> = activations(&proxy).iter().map(|&(_, i)| i).collect();
    assert_eq!(served_by, [2]);
    assert_eq!(pool.arrivals().len(), 1, "{:?}", pool.arrivals());
    assert_eq!(proxy.count_logs(outcome("connect_failed")), 0);
}

#[test]
fn a_refusing_instance_cools_down_while_the_rest_serve_and_serves_again_after() {
    refusing_instance_cools_down(&["--connect-timeout", "0"]);
}

fn refusing_instance_cools_down(extra: &[&str]) {
    let pool = Pool::new(2);
    let dead = unused_port();
    let dead_addr = format!("127.0.0.1:{dead}");
    let upstreams = format!(
        "{},{dead_addr},{}",
        pool.instance(1).arg(),
        pool.instance(2).arg()
    );
    let mut args = vec!["-u", &upstreams, "-n", "1"];
    args.extend_from_slice(extra);
    let proxy = Proxy::start(&args);
    for i in 1..=6 {
        one_client_closed(&proxy, &format!("r{i}"), i);
    }
    let cooldown = proxy.expect_log(event("instance_cooldown"), "instance 2 cools down");
    assert_field(&cooldown, "instance", "2");
    assert_field(&cooldown, "ms", "1000");
    assert_eq!(proxy.count_logs(outcome("connect_failed")), 0);
    assert_eq!(pool.arrivals().len(), 6, "{:?}", pool.arrivals());

    // Once it listens, it serves again when its cool-down has run out.
    // (Its stand-in records as 3: the pool's two are 1 and 2.)
    let arrivals = Arc::clone(&pool.arrivals);
    let _revived = Upstream::spawn_on(&dead_addr, recording_as(3, arrivals))
        .expect("listen on the refusing instance's port");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut i = 6;
    while pool.instance_of_any(3).is_none() {
        assert!(Instant::now() < deadline, "instance 2 never served again");
        i += 1;
        one_client_closed(&proxy, &format!("r{i}"), i);
    }
    assert_eq!(proxy.count_logs(outcome("connect_failed")), 0);
    assert!(
        activations(&proxy).iter().any(|(_, id)| *id == 2),
        "no activation logged on instance 2"
    );
}

impl Pool {
    /// The first line the stand-in recording as `id` got, if any.
    fn instance_of_any(&self, id: usize) -> Option<String> {
        self.arrivals()
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, line)| line)
    }
}

#[test]
fn a_reload_adds_and_removes_instances_without_disturbing_the_rest() {
    let pool = Pool::new(3);
    let (a, b, c) = (pool.instance(1), pool.instance(2), pool.instance(3));
    let dir = TempDir::new("pool-reload-list");
    let conf = |upstream: &str| {
        let text = format!("listen = 127.0.0.1:0\nupstream = {upstream}\npermits = 1\n");
        dir.write_atomic("tcplock.conf", &text)
            .to_string_lossy()
            .into_owned()
    };
    let path = conf(&format!("{},{}", a.arg(), b.arg()));
    let proxy = Proxy::start_raw(&["-c", &path]);

    // x proxies through instance 1 (A) across the reload.
    let mut x = tagged(&proxy, "x");
    served(&mut x, "x");
    assert_eq!(pool.instance_of("x"), Some(1));

    conf(&format!("{},{}", b.arg(), c.arg()));
    proxy.signal("HUP");
    let reloaded = proxy.expect_log(event("reloaded"), "the reload of the list");
    assert_eq!(field(&reloaded, "changed").as_deref(), Some("upstream"));

    for i in 1..=4 {
        one_client_closed(&proxy, &format!("n{i}"), i);
    }
    // B kept number 2, C took the free number 3; A took no one new.
    let after: Vec<(u64, u64)> = activations(&proxy)[1..].to_vec();
    for (n, (conn, id)) in (1..=4).zip(&after) {
        let stand_in = pool.instance_of(&format!("n{n}")).expect("served");
        assert_eq!(*conn, n + 1, "{after:?}");
        assert!(stand_in == 2 || stand_in == 3, "n{n} went to A");
        assert_eq!(u64::try_from(stand_in).unwrap(), *id, "{after:?}");
    }
    let used: BTreeSet<u64> = after.iter().map(|(_, id)| *id).collect();
    assert_eq!(used, BTreeSet::from([2, 3]), "{after:?}");
    assert_eq!(a.accepted(), 1, "the removed instance got a new client");

    // x never noticed.
    roundtrip(&mut x, b"still here\n");
    finish(x);
    assert!(proxy.wait_for_count(outcome("ok"), 5, WAIT));
    let x_closed = proxy.expect_log(closed_with(1, "ok"), "x closed ok");
    assert!(num_field(&x_closed, "bytes_up") >= 13, "{x_closed}");
    assert_eq!(a.errors(), 0);
}

#[test]
fn permits_are_per_instance_two_instances_with_two_each_let_four_through() {
    let pool = Pool::new(2);
    let proxy = Proxy::start(&["-u", &pool.arg(), "-n", "2", "--log-level", "debug"]);
    let mut clients = Vec::new();
    for i in 1..=5u64 {
        clients.push(tagged(&proxy, &format!("p{i}")));
        proxy.expect_log(conn_event("accepted", i), &format!("accepted conn={i}"));
    }
    assert!(pool.wait_arrivals(4), "{:?}", pool.arrivals());
    assert!(
        wait_until(WAIT, || pool.instances.iter().all(|u| u.current() == 2)),
        "not two on each instance"
    );
    assert_eq!(pool.arrivals().len(), 4, "a fifth got through");
    assert!(pool.instance_of("p5").is_none());
    let mut first = clients.remove(0);
    served(&mut first, "p1");
    let freed = pool.instance_of("p1").expect("served");
    finish(first);
    assert!(pool.wait_arrivals(5), "p5 not served");
    assert_eq!(pool.instance_of("p5"), Some(freed));
    for (i, mut s) in (2..=5).zip(clients) {
        served(&mut s, &format!("p{i}"));
        finish(s);
    }
    assert!(proxy.wait_for_count(outcome("ok"), 5, WAIT));
}

#[test]
fn an_instance_at_tcplocks_own_address_is_refused_naming_it() {
    let port = unused_port();
    let other = Upstream::echo();
    let own = format!("127.0.0.1:{port}");
    let upstreams = format!("{},{own}", other.arg());
    let out = run(&["-l", &own, "-u", &upstreams], Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("upstream {own} (instance 2)"))
            && err.contains("own listening address"),
        "{err}"
    );
}

#[test]
fn a_closure_hook_is_told_its_instance() {
    let pool = Pool::new(2);
    let seen: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let record = Arc::clone(&seen);
    let lock = tcplock::Lock::builder()
        .listen("127.0.0.1:0")
        .upstreams(pool.instances.iter().map(Upstream::arg))
        .log_level(tcplock::LogLevel::Error)
        .on_activate(move |ticket: tcplock::Ticket| {
            let upstream = ticket.context().upstream.clone();
            record.lock().unwrap().push((ticket.instance(), upstream));
            ticket.proceed();
        })
        .build()
        .expect("build");
    let addr = lock.local_addr();
    let handle = lock.handle();
    let runner = thread::spawn(move || lock.run().expect("the lock runs until stopped"));
    // Both at once: one on each instance.
    let a = served_at(addr, "a");
    let b = served_at(addr, "b");
    finish(a);
    finish(b);
    let want: Vec<(u32, String)> = vec![(1, pool.instance(1).arg()), (2, pool.instance(2).arg())];
    assert_eq!(*seen.lock().unwrap(), want);
    assert_eq!(pool.instance_of("a"), Some(1));
    assert_eq!(pool.instance_of("b"), Some(2));
    stop(&handle, runner);
}

#[test]
fn a_handle_reload_resolves_and_uses_every_instance() {
    let pool = Pool::new(3);
    let lock = tcplock::Lock::builder()
        .listen("127.0.0.1:0")
        .upstreams([pool.instance(1).arg()])
        .log_level(tcplock::LogLevel::Error)
        .build()
        .expect("build");
    let addr = lock.local_addr();
    let handle = lock.handle();
    let mut config = lock.config().clone();
    let runner = thread::spawn(move || lock.run().expect("the lock runs until stopped"));
    let a = served_at(addr, "a");

    // Instances 2 and 3 added while a holds instance 1's permit.
    config.upstreams = (1..=3)
        .map(|id| tcplock::HostPort {
            host: "127.0.0.1".into(),
            port: pool.instance(id).port(),
        })
        .collect();
    handle.reload(config).expect("reload");
    assert!(
        wait_until(WAIT, || handle.stats().instances.len() == 3),
        "the reload did not add the instances"
    );
    let b = served_at(addr, "b");
    let c = served_at(addr, "c");
    let went: BTreeSet<usize> = ["b", "c"]
        .iter()
        .filter_map(|tag| pool.instance_of(tag))
        .collect();
    assert_eq!(went, BTreeSet::from([2, 3]), "{:?}", pool.arrivals());
    for s in [a, b, c] {
        finish(s);
    }
    stop(&handle, runner);
}

#[test]
fn overlapping_hooks_of_two_instances_log_their_own_output_lines() {
    let pool = Pool::new(2);
    let dir = TempDir::new("pool-hooks-output");
    // Each run waits (bounded) for the other instance's run to have
    // started, then both write lines slowly, interleaved, to stdout and
    // stderr, the last one without a newline.
    let hook = dir.script(
        "hook.sh",
        &(BOTH_AT_ONCE.to_string()
            + r#"
for n in 1 2 3 4 5; do
  printf 'mine=%s n=%s out\n' "$TCPLOCK_INSTANCE" "$n"
  printf 'mine=%s n=%s err\n' "$TCPLOCK_INSTANCE" "$n" >&2
  printf 'mine=%s n=%s part' "$TCPLOCK_INSTANCE" "$n"
  sleep 0.05
  printf 'ial\n'
done
printf 'mine=%s last' "$TCPLOCK_INSTANCE""#),
    );
    let proxy = serve_two_through_overlapping_hooks(&pool, &hook);
    let hook_of = |instance: &str| {
        let started = proxy.matching(event("hook_started"));
        let line = started
            .iter()
            .find(|l| field(l, "instance").as_deref() == Some(instance))
            .unwrap_or_else(|| panic!("no hook_started for instance {instance}"));
        field(line, "hook").expect("hook=")
    };
    let hooks = [hook_of("1"), hook_of("2")];
    assert_ne!(hooks[0], hooks[1]);
    let lines = proxy.matching(|l| is_event(l, "output"));
    // 5 × (out, err, partial) + the last, per instance.
    assert_eq!(lines.len(), 32, "{lines:#?}");
    for line in &lines {
        assert_eq!(
            field(line, "from").as_deref(),
            Some("on-activate"),
            "{line}"
        );
        let text = field(line, "line").expect("line=");
        let mine = text
            .strip_prefix("mine=")
            .and_then(|t| t.split(' ').next())
            .unwrap_or_else(|| panic!("a line the hook did not write: {line}"));
        assert_eq!(field(line, "instance").as_deref(), Some(mine), "{line}");
        let want = &hooks[if mine == "1" { 0 } else { 1 }];
        assert_eq!(field(line, "hook").as_ref(), Some(want), "{line}");
        assert!(
            text.ends_with(" out")
                || text.ends_with(" err")
                || text.ends_with(" partial")
                || text.ends_with(" last"),
            "a line mixed up: {line}"
        );
    }
}
