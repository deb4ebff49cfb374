//! tcplock embedded in a program: a closure restarts a leaky service (headless
//! LibreOffice, say) every 20 connections and after a timeout, while clients
//! wait in the queue. The Rust counterpart of the 2011 tool's
//! `onActivateNextConnection`.
//!
//! ```sh
//! cargo run --example embed -- 9000 127.0.0.1:2002 \
//!     soffice --headless --invisible --nologo --norestore \
//!     '--accept=socket,host=127.0.0.1,port=2002;urp;'
//! # a stand-in service to try it without LibreOffice:
//! cargo run --example embed -- 9000 127.0.0.1:2002 python3 -m http.server 2002 --bind 127.0.0.1
//! ```
//! Stop it with Ctrl-C.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Child, Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tcplock::{Lock, Outcome, Ticket};

/// Restart the service after this many connections, as the leak demands.
const RESTART_EVERY: u64 = 20;
/// How long a fresh service may take to answer on its port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, service @ ..] = args.as_slice() else {
        eprintln!("usage: embed LISTEN UPSTREAM SERVICE_COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    if service.is_empty() {
        eprintln!("embed: no service command given");
        return ExitCode::from(2);
    }
    let service_addr = match upstream.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        _ => {
            eprintln!("embed: cannot resolve upstream '{upstream}'");
            return ExitCode::from(2);
        }
    };
    let service = Arc::new(Service {
        command: service.to_vec(),
        addr: service_addr,
        child: Mutex::new(None),
    });

    let restarter = Arc::clone(&service);
    let lock = Lock::builder()
        .listen(listen.as_str())
        .upstream(upstream.as_str())
        .permits(1)
        .ttl(Duration::from_secs(60))
        .hook_timeout(START_TIMEOUT + Duration::from_secs(5))
        .handle_signals(true)
        .on_activate(move |ticket: Ticket| {
            let service = Arc::clone(&restarter);
            // The loop must not block: restart on a worker, answer from there.
            thread::spawn(move || service.prepare(ticket));
        })
        .on_timeout(|info| {
            eprintln!(
                "embed: conn {} timed out; restarting before the next",
                info.id
            )
        })
        .build();
    let result = lock.and_then(|lock| {
        eprintln!("embed: listening on {}", lock.local_addr());
        lock.run()
    });
    service.stop();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The service behind the lock and its current process.
struct Service {
    command: Vec<String>,
    addr: SocketAddr,
    child: Mutex<Option<Child>>,
}

impl Service {
    /// Makes the service fit for the next client, then answers the ticket.
    fn prepare(&self, ticket: Ticket) {
        let due = ticket.activations().is_multiple_of(RESTART_EVERY)
            || ticket.last_outcome() == Some(Outcome::Timeout)
            || !self.is_running();
        if !due {
            ticket.proceed();
            return;
        }
        match self.restart() {
            Ok(()) => ticket.proceed(),
            Err(e) => {
                eprintln!("embed: restart failed: {e}; the client waits for a retry");
                ticket.fail();
            }
        }
    }

    fn is_running(&self) -> bool {
        let Ok(mut child) = self.child.lock() else {
            return false;
        };
        matches!(child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn restart(&self) -> Result<(), String> {
        let mut child = self.child.lock().map_err(|_| "service state poisoned")?;
        if let Some(mut old) = child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let (program, args) = self.command.split_first().ok_or("no service command")?;
        let started = Command::new(program)
            .args(args)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        *child = Some(started);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{} did not answer within {START_TIMEOUT:?}",
            self.addr
        ))
    }

    fn stop(&self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut old) = child.take()
        {
            let _ = old.kill();
            let _ = old.wait();
        }
    }
}
