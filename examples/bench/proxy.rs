//! The proxies under test as child processes (tcplock, HAProxy), and what the
//! bench reads about them from /proc: CPU time, RSS, open descriptors.
//!
//! A [`Proxy`] is killed and reaped when dropped; children also get SIGKILL
//! if the bench dies first (`PR_SET_PDEATHSIG`).

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a proxy may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The queue bound both proxies are configured with (tcplock `--max-queue`,
/// HAProxy `maxconn`), so their fixed allocations are sized alike.
pub const MAX_QUEUE: usize = 20_000;
/// Stderr lines kept per proxy, shown when it fails.
const STDERR_TAIL: usize = 20;

/// Which proxy, and how to run it.
#[derive(Clone, Debug)]
pub enum Kind {
    Tcplock {
        exe: PathBuf,
        log_level: String,
        /// Extra arguments (`--tcplock-args`), e.g. `--splice on`.
        extra: Vec<String>,
    },
    Haproxy {
        exe: PathBuf,
    },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Tcplock { .. } => "tcplock",
            Kind::Haproxy { .. } => "haproxy",
        }
    }
}

/// What a proxy forwards to: one upstream, or a pool of instances behind one
/// queue.
enum Upstream<'a> {
    One(SocketAddr),
    Pool(&'a [SocketAddr]),
}

/// A running proxy listening on `addr`.
pub struct Proxy {
    child: Child,
    pub addr: SocketAddr,
    config_file: Option<PathBuf>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` letting `permits` connections
    /// through at once, and waits until it listens.
    pub fn start(kind: &Kind, upstream: SocketAddr, permits: usize) -> Result<Proxy, String> {
        Proxy::start_with_queue(kind, upstream, permits, MAX_QUEUE)
    }

    /// As [`Proxy::start`], with tcplock's `--max-queue` at `max_queue`
    /// (HAProxy keeps [`MAX_QUEUE`]).
    pub fn start_with_queue(
        kind: &Kind,
        upstream: SocketAddr,
        permits: usize,
        max_queue: usize,
    ) -> Result<Proxy, String> {
        Proxy::start_retried(kind, &Upstream::One(upstream), permits, max_queue)
    }

    /// Starts a proxy in front of a pool of `instances` behind one queue,
    /// `permits` connections at once on each: tcplock
    /// `-u A,B,... -n permits`, HAProxy one `server ... maxconn permits`
    /// line per instance (see [`haproxy_config`]).
    pub fn start_pool(
        kind: &Kind,
        instances: &[SocketAddr],
        permits: usize,
    ) -> Result<Proxy, String> {
        Proxy::start_retried(kind, &Upstream::Pool(instances), permits, MAX_QUEUE)
    }

    fn start_retried(
        kind: &Kind,
        upstream: &Upstream,
        permits: usize,
        max_queue: usize,
    ) -> Result<Proxy, String> {
        // The port is picked by binding :0 and releasing it; another process
        // could grab it in between, so a failed start is retried.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Proxy::try_start(kind, upstream, permits, max_queue) {
                Ok(proxy) => return Ok(proxy),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    fn try_start(
        kind: &Kind,
        upstream: &Upstream,
        permits: usize,
        max_queue: usize,
    ) -> Result<Proxy, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (mut command, config_file) = match kind {
            Kind::Tcplock {
                exe,
                log_level,
                extra,
            } => {
                let mut command = Command::new(exe);
                command.args(["-l", &addr.to_string()]);
                match upstream {
                    Upstream::One(upstream) => {
                        command.args(["-h", "127.0.0.1", "-p", &upstream.port().to_string()])
                    }
                    Upstream::Pool(instances) => {
                        let list: Vec<String> = instances.iter().map(|a| a.to_string()).collect();
                        command.args(["-u", &list.join(",")])
                    }
                };
                command.args([
                    "-n",
                    &permits.to_string(),
                    "--max-queue",
                    &max_queue.to_string(),
                    "--log-level",
                    log_level,
                ]);
                command.args(extra);
                (command, None)
            }
            Kind::Haproxy { exe } => {
                let path = std::env::temp_dir()
                    .join(format!("tcplock-bench-{}-{port}.cfg", std::process::id()));
                fs::write(&path, haproxy_config(addr, upstream, permits))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                let mut command = Command::new(exe);
                command.arg("-db").arg("-f").arg(&path);
                (command, Some(path))
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", kind.name()))?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut stderr_reader = None;
        if let Some(stderr) = child.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            // Drained so the proxy never blocks on a full pipe.
            stderr_reader = Some(thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }));
        }
        let mut proxy = Proxy {
            child,
            addr,
            config_file,
            stderr_tail,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                // Its last words may still be in the pipe: give the reader
                // until the end of stream, briefly.
                let until = Instant::now() + Duration::from_secs(1);
                while stderr_reader.as_ref().is_some_and(|r| !r.is_finished())
                    && Instant::now() < until
                {
                    thread::sleep(Duration::from_millis(5));
                }
                return Err(format!(
                    "{} exited at start ({status}): {}",
                    kind.name(),
                    proxy.stderr()
                ));
            }
            if listens(proxy.pid(), port) {
                // For attaching perf or strace to a run.
                eprintln!("  {} pid {} on {addr}", kind.name(), proxy.pid());
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not listen on {addr} within {START_TIMEOUT:?}: {}",
                    kind.name(),
                    proxy.stderr()
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the proxy wrote to stderr, joined.
    pub fn stderr(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// User + system CPU time so far, in seconds (all threads).
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_ticks().map_or(f64::NAN, |(user, system)| {
            (user + system) as f64 / clock_ticks_per_second()
        })
    }

    /// User CPU time so far, in seconds: the proxy's own work, without the
    /// kernel's (socket teardown, say).
    pub fn user_cpu_seconds(&self) -> f64 {
        self.cpu_ticks()
            .map_or(f64::NAN, |(user, _)| user as f64 / clock_ticks_per_second())
    }

    /// (utime, stime) in clock ticks.
    fn cpu_ticks(&self) -> Option<(u64, u64)> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line, 12 and 13 after the name.
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        Some((ticks(11)?, ticks(12)?))
    }

    /// Resident set size in bytes (includes shared library pages).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// Anonymous resident memory in bytes: the process's own heap and stacks.
    pub fn anon_rss_bytes(&self) -> u64 {
        self.status_bytes("RssAnon:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// Open file descriptors.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |dir| dir.count())
    }

    /// Waits until the proxy holds at least `fds` descriptors (it has accepted
    /// what the bench connected), then lets it settle.
    pub fn wait_for_fds(&self, fds: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.fd_count();
            if now >= fds {
                thread::sleep(Duration::from_millis(200));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "proxy holds {now} fds, expected {fds} within {timeout:?}: {}",
                    self.stderr()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.config_file {
            let _ = fs::remove_file(path);
        }
    }
}

/// HAProxy 2.6 as an operator would deploy it for this job: TCP mode, one
/// thread, one server with `maxconn permits` and a long queue timeout.
///
/// A pool is one `server sN ... maxconn permits` line per instance behind
/// `balance leastconn`. Its queue order (HAProxy's `src/queue.c`, 2.6's
/// configuration.txt on `maxconn`, `timeout queue` and `set-priority-class`):
/// a connection no server has a free slot for waits in the backend's queue
/// (a server's own queue holds only connections bound to that server, by
/// persistence, which TCP mode here has none of); the queue is sorted by
/// priority class, then by the time it was queued in milliseconds plus
/// `set-priority-offset`, equal keys in insertion order; a server whose
/// slot frees takes the older of its own queue's head and the backend
/// queue's head. Without priorities that is one FIFO for the whole pool, as
/// good as HAProxy's order gets: the balance algorithm only picks among
/// servers with a free slot when nobody waits (`leastconn` spreads the load;
/// `first` would fill s1 first and order the queue the same way), and
/// `maxqueue` is left unset so nothing is redispatched around the queue.
/// (Measured by the pool scenario: the requests reach the servers in queue
/// order to within tens of microseconds; servers that free up together are
/// refilled in one turn of HAProxy's loop, in an order of its own.)
///
/// HAProxy wants 2 × maxconn descriptors; where the hard limit is lower (a
/// container), `ulimit-n` is capped at it and `no strict-limits` lets HAProxy
/// start anyway. Queued connections use one descriptor each, so the queue
/// scenario still fits.
fn haproxy_config(listen: SocketAddr, upstream: &Upstream, permits: usize) -> String {
    let servers = match upstream {
        Upstream::One(upstream) => format!("    server s1 {upstream} maxconn {permits}\n"),
        Upstream::Pool(instances) => {
            let mut lines = "    balance leastconn\n".to_owned();
            for (i, instance) in instances.iter().enumerate() {
                lines += &format!("    server s{} {instance} maxconn {permits}\n", i + 1);
            }
            lines
        }
    };
    let wanted = 2 * MAX_QUEUE as u64 + 64;
    let ulimit = hard_open_files_limit().map_or(wanted, |hard| hard.min(wanted));
    format!(
        "global
    nbthread 1
    maxconn {MAX_QUEUE}
    ulimit-n {ulimit}
    no strict-limits

defaults
    mode tcp
    timeout connect 10s
    timeout client 10m
    timeout server 10m
    timeout queue 10m

frontend fe
    bind {listen}
    maxconn {MAX_QUEUE}
    default_backend be

backend be
{servers}"
    )
}

pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether process `pid` owns a listening IPv4 socket on `port` (a socket in
/// state LISTEN in /proc/net/tcp whose inode is one of the process's fds).
fn listens(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let suffix = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            let local = fields.get(1)?;
            let inode = fields.get(9)?;
            (listening && local.ends_with(&suffix)).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.filter_map(Result::ok).any(|entry| {
        fs::read_link(entry.path())
            .is_ok_and(|target| inodes.iter().any(|inode| Path::new(inode) == target))
    })
}

/// Asks the kernel to SIGKILL the child if the bench dies first, so no proxy
/// outlives an interrupted run.
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn hard_open_files_limit() -> io::Result<u64> {
    Ok(open_files_limit()?.rlim_max)
}

fn open_files_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Raises this process's soft limit on open files to the hard limit (the queue
/// scenario holds ten thousand client sockets). Returns the new soft limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = open_files_limit()?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
