//! The library API used directly, in-process: closure hooks answered from other
//! threads, dropped tickets, and stopping from another thread.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Upstream, WAIT, connect, quiet_lock, roundtrip, wait_until};
use tcplock::{Lock, Outcome, Ticket};

/// Runs the lock on its own thread; returns its address, handle and join handle.
fn spawn(
    lock: Lock,
) -> (
    std::net::SocketAddr,
    tcplock::Handle,
    thread::JoinHandle<()>,
) {
    let addr = lock.local_addr();
    let handle = lock.handle();
    let runner = thread::spawn(move || lock.run().expect("the lock runs until stopped"));
    (addr, handle, runner)
}

fn join_within(runner: thread::JoinHandle<()>, timeout: Duration) {
    assert!(
        wait_until(timeout, || runner.is_finished()),
        "run() did not return within {timeout:?}"
    );
    runner.join().expect("the loop thread did not panic");
}

#[test]
fn a_closure_hook_proceeds_from_another_thread_after_a_delay() {
    let upstream = Upstream::echo();
    let proceeded_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let seen = Arc::clone(&proceeded_at);
    let lock = quiet_lock(&upstream)
        .on_activate(move |ticket: Ticket| {
            let seen = Arc::clone(&seen);
            thread::spawn(move || {
                // The delay stands for a service restart; the client must wait it out.
                thread::sleep(Duration::from_millis(150));
                if let Ok(mut at) = seen.lock() {
                    *at = Some(Instant::now());
                }
                ticket.proceed();
            });
        })
        .build()
        .expect("build");
    let (addr, handle, runner) = spawn(lock);

    let started = Instant::now();
    let mut client = connect(addr);
    roundtrip(&mut client, b"after the restart");
    let answered = proceeded_at
        .lock()
        .expect("lock")
        .expect("the hook answered before any byte went through");
    assert!(answered >= started + Duration::from_millis(150));
    assert_eq!(upstream.accepted(), 1);
    drop(client);
    assert!(wait_until(WAIT, || handle.stats().count(Outcome::Ok) == 1));
    assert_eq!(handle.stats().activations, 1);
    handle.stop();
    join_within(runner, WAIT);
}

#[test]
fn a_dropped_ticket_counts_as_a_failure_and_is_retried() {
    let upstream = Upstream::echo();
    let calls = Arc::new(AtomicU32::new(0));
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (counter, seen) = (Arc::clone(&calls), Arc::clone(&attempts));
    let lock = quiet_lock(&upstream)
        .on_activate(move |ticket: Ticket| {
            seen.lock().expect("lock").push(ticket.attempt());
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                drop(ticket);
            } else {
                ticket.proceed();
            }
        })
        .build()
        .expect("build");
    let (addr, handle, runner) = spawn(lock);

    let mut client = connect(addr);
    roundtrip(&mut client, b"second time lucky");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(*attempts.lock().expect("lock"), vec![1, 2]);
    assert_eq!(
        upstream.accepted(),
        1,
        "the failed attempt never reached the upstream"
    );
    drop(client);
    handle.stop();
    join_within(runner, WAIT);
}

#[test]
fn stop_from_another_thread_closes_the_queued_and_lets_the_active_finish() {
    let upstream = Upstream::echo();
    let lock = quiet_lock(&upstream)
        .shutdown_grace(Duration::from_secs(10))
        .build()
        .expect("build");
    let (addr, handle, runner) = spawn(lock);

    let mut active = connect(addr);
    roundtrip(&mut active, b"holding the permit");
    let mut queued: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
    assert!(wait_until(WAIT, || handle.stats().queue_length == 2));

    let stopper = handle.clone();
    thread::spawn(move || stopper.stop())
        .join()
        .expect("stop from another thread");
    for client in &mut queued {
        let mut byte = [0u8; 1];
        let read = client.read(&mut byte);
        assert!(
            matches!(read, Ok(0)) || read.is_err(),
            "a queued client is closed: {read:?}"
        );
    }
    roundtrip(&mut active, b"still served during the grace");
    assert!(
        !runner.is_finished(),
        "the proxying client keeps the loop alive"
    );
    drop(active);
    join_within(runner, WAIT);
    let stats = handle.stats();
    assert_eq!(stats.count(Outcome::Shutdown), 2);
    assert_eq!(stats.count(Outcome::Ok), 1);
}

#[test]
fn reload_from_a_handle_raises_the_permits_for_a_waiting_client() {
    let upstream = Upstream::echo();
    let lock = quiet_lock(&upstream).build().expect("build");
    let mut config = lock.config().clone();
    let (addr, handle, runner) = spawn(lock);

    let mut first = connect(addr);
    roundtrip(&mut first, b"one");
    let mut second = connect(addr);
    assert!(wait_until(WAIT, || handle.stats().queue_length == 1));
    config.permits = 2;
    handle.reload(config).expect("a valid reload");
    roundtrip(&mut second, b"two at once");
    assert_eq!(upstream.max_concurrent(), 2);
    drop((first, second));
    handle.stop();
    join_within(runner, WAIT);
}

#[test]
fn build_errors_name_the_problem() {
    let missing = Lock::builder().upstream("127.0.0.1:1").build();
    assert!(matches!(&missing, Err(e) if e.to_string().contains("listen")));
    let bad = Lock::builder()
        .listen("127.0.0.1:0")
        .upstream("127.0.0.1:1")
        .permits(0)
        .build();
    assert!(matches!(&bad, Err(e) if e.to_string().contains("permits")));
    let unresolvable = Lock::builder()
        .listen("127.0.0.1:0")
        .upstream("no-such-host.invalid:80")
        .build();
    assert!(matches!(&unresolvable, Err(e) if e.to_string().contains("no-such-host.invalid")));
}

#[test]
fn a_reload_that_cannot_apply_is_refused_and_changes_nothing() {
    let upstream = Upstream::echo();
    let lock = quiet_lock(&upstream).build().expect("build");
    let config = lock.config().clone();
    let (addr, handle, runner) = spawn(lock);

    let mut zero_permits = config.clone();
    zero_permits.permits = 0;
    assert!(matches!(handle.reload(zero_permits), Err(e) if e.to_string().contains("permits")));
    let mut unresolvable = config;
    unresolvable.upstreams = vec![tcplock::HostPort {
        host: "no-such-host.invalid".into(),
        port: 80,
    }];
    assert!(handle.reload(unresolvable).is_err());
    let mut client = connect(addr);
    roundtrip(&mut client, b"still the old settings");
    drop(client);
    handle.stop();
    join_within(runner, WAIT);
}

#[test]
fn the_types_that_cross_threads_say_so() {
    fn send<T: Send>() {}
    fn send_sync_clone<T: Send + Sync + Clone>() {}
    send::<Lock>();
    send::<Ticket>();
    send_sync_clone::<tcplock::Handle>();
    send_sync_clone::<tcplock::Hook>();
}

#[test]
fn the_builder_gets_the_checks_the_command_line_gets() {
    let upstream = Upstream::echo();
    // Duration::MAX once overflowed a deadline in the loop (a panic in a
    // debug build); now it is refused like `--queue-timeout 200y`.
    let refused = |builder: tcplock::Builder| match builder.build() {
        Err(tcplock::Error::Invalid(message)) => message,
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("built"),
    };
    let message = refused(quiet_lock(&upstream).queue_timeout(Duration::MAX));
    assert!(message.starts_with("queue-timeout: "), "{message}");
    let message = refused(quiet_lock(&upstream).ttl(Duration::MAX));
    assert!(message.starts_with("timeout: "), "{message}");
    let message = refused(quiet_lock(&upstream).permits(0));
    assert_eq!(message, "permits: '0' is too small (at least 1)");
    let nul = tcplock::Hook::command("true\0false");
    let message = refused(quiet_lock(&upstream).on_activate_hook(nul));
    assert!(message.starts_with("on-activate: "), "{message}");
    let long = tcplock::Hook::command("x".repeat(200 * 1024));
    let message = refused(quiet_lock(&upstream).on_timeout_hook(long));
    assert!(message.starts_with("on-timeout: "), "{message}");
}
