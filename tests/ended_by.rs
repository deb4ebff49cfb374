//! Every `event=closed` line says who ended the connection (`ended_by=`): the
//! side that closed or reset first while proxying, the client for one that
//! left while waiting, tcplock for what it cut itself. Hooks see it for the
//! last connection as `TCPLOCK_LAST_ENDED_BY`.
mod common;
mod hookkit;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::thread;

use common::*;
use hookkit::*;
use tcplock::{EndedBy, Outcome, Ticket};

/// Predicate: `event=closed conn=CONN outcome=OUTCOME`, whoever ended it.
fn closed_line(proxy: &Proxy, conn: u64, outcome: &'static str) -> String {
    proxy.expect_log(
        closed_with(conn, outcome),
        &format!("closed conn={conn} outcome={outcome}"),
    )
}

fn ended_by(line: &str) -> String {
    field(line, "ended_by").unwrap_or_else(|| format!("<no ended_by in: {line}>"))
}

/// Says goodbye and closes at once, reading nothing.
fn hanging_up_upstream() -> Upstream {
    Upstream::spawn(|mut s, active| {
        let _ = s.write_all(b"bye\n");
        drop(active);
        drop(s); // FIN: nothing unread
    })
}

/// The client reads the goodbye and its end of stream, then closes too.
fn served_by_a_hanging_up_upstream(proxy: &Proxy) {
    let mut c = proxy.connect();
    let mut got = Vec::new();
    c.read_to_end(&mut got)
        .expect("the goodbye, then end of stream");
    assert_eq!(got, b"bye\n");
    c.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

#[test]
fn a_client_that_closes_first_ended_it() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg()]);
    let mut c = proxy.connect();
    roundtrip(&mut c, b"ping\n");
    finish(c);
    assert_eq!(ended_by(&closed_line(&proxy, 1, "ok")), "client");
}

#[test]
fn an_upstream_that_closes_first_ended_it() {
    let up = hanging_up_upstream();
    let proxy = Proxy::start(&["-u", &up.arg()]);
    served_by_a_hanging_up_upstream(&proxy);
    assert_eq!(ended_by(&closed_line(&proxy, 1, "ok")), "upstream");
}

#[test]
fn an_upstream_that_resets_first_ended_it() {
    // Reads one byte of two and closes: the unread byte turns the close into RST.
    let up = Upstream::spawn(|mut s, _active| {
        let mut first = [0u8; 1];
        let mut pending = [0u8; 1];
        if s.read_exact(&mut first).is_ok() && s.peek(&mut pending).is_ok_and(|n| n == 1) {
            drop(s);
        }
    });
    let proxy = Proxy::start(&["-u", &up.arg()]);
    let mut c = proxy.connect();
    c.write_all(b"go").expect("send");
    expect_closed(&mut c, WAIT).expect("the connection ends");
    assert_eq!(
        ended_by(&closed_line(&proxy, 1, "upstream_error")),
        "upstream"
    );
}

#[test]
fn a_ttl_expiry_is_ended_by_tcplock() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "-t", "300ms"]);
    let mut c = proxy.connect();
    roundtrip(&mut c, b"staying\n");
    let line = closed_line(&proxy, 1, "timeout");
    assert_eq!(ended_by(&line), "tcplock");
}

#[test]
fn a_client_that_leaves_the_queue_ended_it() {
    let up = Upstream::echo();
    let proxy = Proxy::start(&["-u", &up.arg(), "--log-level", "debug"]);
    let mut holder = proxy.connect();
    roundtrip(&mut holder, b"holding the permit\n");
    let waiter = proxy.connect();
    proxy.expect_log(conn_event("accepted", 2), "conn 2 accepted");
    drop(waiter);
    assert_eq!(ended_by(&closed_line(&proxy, 2, "abandoned")), "client");
    finish(holder);
}

#[test]
fn hooks_are_told_who_ended_the_last_connection() {
    let dir = TempDir::new("ended-by");
    let hook = dir.script("hook.sh", &dump_env_to("env.$TCPLOCK_CONN_ID"));
    let up = hanging_up_upstream();
    let proxy = Proxy::start(&["-u", &up.arg(), "--on-activate", &hook]);
    for conn in [1, 2] {
        served_by_a_hanging_up_upstream(&proxy);
        closed_line(&proxy, conn, "ok");
    }
    let first = dir.env_file("env.1");
    let second = dir.env_file("env.2");
    let get = |env: &std::collections::BTreeMap<String, String>, key: &str| {
        env.get(key).cloned().unwrap_or_else(|| "<unset>".into())
    };
    assert_eq!(get(&first, "TCPLOCK_LAST_ENDED_BY"), "none", "{first:?}");
    assert_eq!(get(&second, "TCPLOCK_LAST_OUTCOME"), "ok", "{second:?}");
    assert_eq!(
        get(&second, "TCPLOCK_LAST_ENDED_BY"),
        "upstream",
        "{second:?}"
    );
}

#[test]
fn a_closure_hook_is_told_who_ended_the_last_connection() {
    let up = Upstream::echo();
    let seen: Arc<Mutex<Vec<Option<EndedBy>>>> = Arc::default();
    let record = Arc::clone(&seen);
    let lock = quiet_lock(&up)
        .on_activate(move |ticket: Ticket| {
            record.lock().expect("lock").push(ticket.last_ended_by());
            ticket.proceed();
        })
        .build()
        .expect("build");
    let addr = lock.local_addr();
    let handle = lock.handle();
    let runner = thread::spawn(move || lock.run().expect("run"));
    for done in 1..=2 {
        let mut c = connect(addr);
        roundtrip(&mut c, b"ping\n");
        finish(c);
        assert!(wait_until(WAIT, || handle.stats().count(Outcome::Ok) == done));
    }
    assert_eq!(*seen.lock().expect("lock"), [None, Some(EndedBy::Client)]);
    handle.stop();
    assert!(wait_until(WAIT, || runner.is_finished()));
    runner.join().expect("loop thread");
}
