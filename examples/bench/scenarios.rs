//! The five scenarios of issue 5 and those added since, one function each. Every run starts its own
//! proxy (or none, for "direct") and returns one value per metric, in the
//! order of [`Scenario::metrics`]; `NaN` means "does not apply".

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::proxy::{Kind, Proxy};
use crate::upstream::{Arrival, Upstreams};

/// Read/write timeout on every client socket of the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the proxy may take to accept everything the bench connected.
const ACCEPT_WAIT: Duration = Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;
/// The recorder index the FIFO scenario's permit holder sends.
const HOLDER: u32 = u32::MAX;

/// Sizes of one bench invocation.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub bulk_bytes: u64,
    pub churn: Duration,
    pub clients: usize,
    pub churn_permits: usize,
    pub queued: usize,
    pub proxying: usize,
    pub proxying_fill: usize,
    pub fifo: usize,
    pub leaving: usize,
    pub pool_clients: usize,
    pub pool_instances: usize,
    pub pool_service: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    BulkEcho,
    BulkUp,
    BulkDown,
    Churn,
    Queue,
    Proxying,
    Fifo,
    QueueLeave,
    Scrape,
    Pool,
}

pub struct Metric {
    pub name: &'static str,
    pub higher_is_better: bool,
}

const fn up(name: &'static str) -> Metric {
    Metric {
        name,
        higher_is_better: true,
    }
}

const fn down(name: &'static str) -> Metric {
    Metric {
        name,
        higher_is_better: false,
    }
}

const BULK: &[Metric] = &[up("MB/s"), down("proxy CPU s")];
const CHURN: &[Metric] = &[
    up("conn/s"),
    down("latency p50 µs"),
    down("latency p90 µs"),
    down("latency p99 µs"),
    down("proxy CPU µs/conn"),
    down("failed conns"),
];
const QUEUE: &[Metric] = &[
    down("RSS idle KiB"),
    down("anon RSS idle KiB"),
    down("RSS holding KiB"),
    down("B per queued conn"),
];
const PROXYING: &[Metric] = &[
    down("RSS idle KiB"),
    down("RSS holding KiB"),
    down("B per proxying conn"),
    down("B/conn, buffers filled"),
];
const FIFO: &[Metric] = &[down("inversions"), up("served in time")];
const SCRAPE: &[Metric] = &[
    down("scrape p50 µs"),
    down("scrape p99 µs"),
    down("proxy CPU µs/scrape"),
    down("scrape KiB"),
    down("RSS idle KiB"),
    down("RSS idle KiB --metrics"),
    down("B per queued conn --metrics"),
];
const POOL: &[Metric] = &[
    up("clients/s"),
    down("wait p50 ms"),
    down("wait p99 ms"),
    down("inversions"),
    down("inversions > 1 ms"),
    up("served"),
    down("instance load max−min"),
];
const QUEUE_LEAVE: &[Metric] = &[
    down("worst echo round trip ms"),
    down("echo round trip p50 ms"),
    down("drain ms"),
    down("proxy CPU ms in drain"),
    down("proxy user CPU ms in drain"),
];

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::BulkEcho,
        Scenario::BulkUp,
        Scenario::BulkDown,
        Scenario::Churn,
        Scenario::Queue,
        Scenario::Proxying,
        Scenario::Fifo,
        Scenario::QueueLeave,
        Scenario::Scrape,
        Scenario::Pool,
    ];

    /// The name `--only` selects it by (the three bulk runs share one).
    pub fn group(self) -> &'static str {
        match self {
            Scenario::BulkEcho | Scenario::BulkUp | Scenario::BulkDown => "bulk",
            Scenario::Churn => "churn",
            Scenario::Queue => "queue",
            Scenario::Proxying => "proxying",
            Scenario::Fifo => "fifo",
            Scenario::QueueLeave => "queue-leave",
            Scenario::Scrape => "scrape",
            Scenario::Pool => "pool",
        }
    }

    pub fn label(self, sizes: &Sizes) -> String {
        let mib = sizes.bulk_bytes / (1024 * 1024);
        match self {
            Scenario::BulkEcho => format!("bulk echo {mib} MiB"),
            Scenario::BulkUp => format!("bulk up {mib} MiB"),
            Scenario::BulkDown => format!("bulk down {mib} MiB"),
            Scenario::Churn => format!(
                "churn C={} N={} {:?}",
                sizes.clients, sizes.churn_permits, sizes.churn
            ),
            Scenario::Queue => format!("queue K={} N=1", sizes.queued),
            Scenario::Proxying => format!("proxying {0} N={0}", sizes.proxying),
            Scenario::Fifo => format!("fifo {} N=1", sizes.fifo),
            Scenario::QueueLeave => format!("queue-leave K={} N=1", sizes.leaving),
            Scenario::Scrape => format!("scrape K={} N=1", sizes.queued),
            Scenario::Pool => format!(
                "pool C={} K={} {}ms N=1",
                sizes.pool_clients,
                sizes.pool_instances,
                sizes.pool_service.as_secs_f64() * 1e3
            ),
        }
    }

    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Scenario::BulkEcho | Scenario::BulkUp | Scenario::BulkDown => BULK,
            Scenario::Churn => CHURN,
            Scenario::Queue => QUEUE,
            Scenario::Proxying => PROXYING,
            Scenario::Fifo => FIFO,
            Scenario::QueueLeave => QUEUE_LEAVE,
            Scenario::Scrape => SCRAPE,
            Scenario::Pool => POOL,
        }
    }

    /// What the report says under the table when this scenario ran.
    pub fn note(self) -> Option<&'static str> {
        match self {
            Scenario::Pool => Some(
                "pool: no direct column: a client straight to one instance has no queue in front \
                 of the pool. tcplock runs `-u A,B,... -n 1`,\n  HAProxy `balance leastconn` \
                 with one `server ... maxconn 1` line per instance. wait = a client's connect \
                 done → its request reaching an instance\n  (the kernel's receive time); \
                 inversions = pairs of clients whose requests reached the instances in the \
                 opposite order of their connects;\n  > 1 ms: those where the later one was \
                 more than 1 ms ahead; instance load max−min: requests on the busiest \
                 instance minus the idlest.",
            ),
            _ => None,
        }
    }

    /// Whether a direct connection (no proxy) makes sense as a baseline.
    pub fn has_direct(self) -> bool {
        matches!(
            self,
            Scenario::BulkEcho | Scenario::BulkUp | Scenario::BulkDown | Scenario::Churn
        )
    }

    /// One run through `proxy` (`None`: straight to the upstream).
    pub fn run(
        self,
        proxy: Option<&Kind>,
        up: &Upstreams,
        sizes: &Sizes,
    ) -> Result<Vec<f64>, String> {
        match self {
            Scenario::BulkEcho => bulk_echo(proxy, up.echo, sizes.bulk_bytes),
            Scenario::BulkUp => bulk_up(proxy, up.sink, sizes.bulk_bytes),
            Scenario::BulkDown => bulk_down(proxy, up.source, sizes.bulk_bytes),
            Scenario::Churn => churn(proxy, up.echo, sizes),
            Scenario::Queue => queue_memory(proxy, up.echo, sizes.queued),
            Scenario::Proxying => proxying_memory(proxy, up.echo, sizes),
            Scenario::Fifo => fifo(proxy, up, sizes.fifo),
            Scenario::QueueLeave => queue_leave(proxy, up.echo, sizes.leaving),
            Scenario::Scrape => scrape(proxy, up.echo, sizes.queued),
            Scenario::Pool => pool(proxy, up, sizes),
        }
    }
}

// ----- 1. bulk -----

/// One connection, `bytes` echoed: a writer thread sends, this thread reads.
fn bulk_echo(proxy: Option<&Kind>, upstream: SocketAddr, bytes: u64) -> Result<Vec<f64>, String> {
    let (addr, proxy) = launch(proxy, upstream, 4)?;
    let stream = connect(addr)?;
    let writer_stream = stream.try_clone().map_err(err("clone"))?;
    let cpu = CpuMeter::start(proxy.as_ref());
    let started = Instant::now();
    let writer = thread::spawn(move || send_bytes(&writer_stream, bytes));
    let received = receive_all(&stream).map_err(err("echo read"));
    let sent = writer
        .join()
        .map_err(|_| "writer panicked".to_owned())?
        .map_err(err("echo write"));
    let elapsed = started.elapsed();
    sent?;
    check_count("echoed", received?, bytes)?;
    Ok(vec![mb_per_s(bytes, elapsed), cpu.seconds()])
}

/// `bytes` client → upstream; done when the sink has counted them all.
fn bulk_up(proxy: Option<&Kind>, upstream: SocketAddr, bytes: u64) -> Result<Vec<f64>, String> {
    let (addr, proxy) = launch(proxy, upstream, 4)?;
    let mut stream = connect(addr)?;
    let cpu = CpuMeter::start(proxy.as_ref());
    let started = Instant::now();
    send_bytes(&stream, bytes).map_err(err("sink write"))?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).map_err(err("sink count"))?;
    let elapsed = started.elapsed();
    check_count("sunk", u64::from_le_bytes(count), bytes)?;
    Ok(vec![mb_per_s(bytes, elapsed), cpu.seconds()])
}

/// `bytes` upstream → client, until the source's end of stream.
fn bulk_down(proxy: Option<&Kind>, upstream: SocketAddr, bytes: u64) -> Result<Vec<f64>, String> {
    let (addr, proxy) = launch(proxy, upstream, 4)?;
    let mut stream = connect(addr)?;
    let cpu = CpuMeter::start(proxy.as_ref());
    let started = Instant::now();
    stream
        .write_all(&bytes.to_le_bytes())
        .map_err(err("source request"))?;
    let received = receive_all(&stream).map_err(err("source read"))?;
    let elapsed = started.elapsed();
    check_count("sourced", received, bytes)?;
    Ok(vec![mb_per_s(bytes, elapsed), cpu.seconds()])
}

// ----- 2. churn -----

/// C client threads, each looping connect → 64 B → echo → close until the
/// deadline; latency is connect start to echo received.
fn churn(proxy: Option<&Kind>, upstream: SocketAddr, sizes: &Sizes) -> Result<Vec<f64>, String> {
    let (addr, proxy) = launch(proxy, upstream, sizes.churn_permits)?;
    let barrier = Arc::new(Barrier::new(sizes.clients + 1));
    let duration = sizes.churn;
    let workers: Vec<_> = (0..sizes.clients)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || churn_client(addr, i, &barrier, duration))
        })
        .collect();
    barrier.wait();
    let cpu = CpuMeter::start(proxy.as_ref());
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut failed = 0u64;
    for worker in workers {
        let (lat, fails) = worker
            .join()
            .map_err(|_| "churn client panicked".to_owned())?;
        latencies.extend(lat);
        failed += fails;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu.seconds();
    if latencies.is_empty() {
        return Err(format!("no connection succeeded ({failed} failed)"));
    }
    latencies.sort_unstable();
    let n = latencies.len();
    let pct = |q: f64| latencies[((n - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Ok(vec![
        n as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        cpu_seconds * 1e6 / n as f64,
        failed as f64,
    ])
}

/// Returns the latencies (ns) of the successful connections and the number
/// of failed ones.
fn churn_client(
    addr: SocketAddr,
    id: usize,
    barrier: &Barrier,
    duration: Duration,
) -> (Vec<u64>, u64) {
    let mut request = [0u8; 64];
    for (i, byte) in request.iter_mut().enumerate() {
        *byte = (id + i) as u8;
    }
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut failed = 0;
    barrier.wait();
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        let started = Instant::now();
        let ok = (|| -> io::Result<bool> {
            let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
            stream.write_all(&request)?;
            let mut reply = [0u8; 64];
            stream.read_exact(&mut reply)?;
            Ok(reply == request)
        })();
        match ok {
            Ok(true) => latencies.push(started.elapsed().as_nanos() as u64),
            _ => {
                failed += 1;
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    (latencies, failed)
}

// ----- 3. queue memory -----

/// One connection holds the single permit; `k` more wait behind it.
fn queue_memory(proxy: Option<&Kind>, upstream: SocketAddr, k: usize) -> Result<Vec<f64>, String> {
    let (addr, proxy) = launch(proxy, upstream, 1)?;
    let proxy = proxy.ok_or("the queue scenario needs a proxy")?;
    settle();
    let idle = proxy.rss_bytes();
    let idle_anon = proxy.anon_rss_bytes();
    let idle_fds = proxy.fd_count();
    let _holder = proxied_echo(addr, 1)?;
    // The holder's buffers are not queue cost: measure from here.
    let holding_one = proxy.rss_bytes();
    let mut queued = Vec::with_capacity(k);
    for i in 0..k {
        queued.push(connect(addr).map_err(|e| format!("queued client {i}: {e}"))?);
    }
    // Client and upstream socket of the holder, one socket per queued client.
    proxy.wait_for_fds(idle_fds + 2 + k, ACCEPT_WAIT)?;
    let holding = proxy.rss_bytes();
    Ok(vec![
        kib(idle),
        kib(idle_anon),
        kib(holding),
        holding.saturating_sub(holding_one) as f64 / k as f64,
    ])
}

// ----- 4. proxying memory -----

/// N permits, N idle proxied connections (each echoed one byte); then each
/// echoes `proxying_fill` bytes so every relay buffer has been written.
fn proxying_memory(
    proxy: Option<&Kind>,
    upstream: SocketAddr,
    sizes: &Sizes,
) -> Result<Vec<f64>, String> {
    let n = sizes.proxying;
    let (addr, proxy) = launch(proxy, upstream, n)?;
    let proxy = proxy.ok_or("the proxying scenario needs a proxy")?;
    settle();
    let idle = proxy.rss_bytes();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(proxied_echo(addr, 1).map_err(|e| format!("connection {i}: {e}"))?);
    }
    settle();
    let holding = proxy.rss_bytes();
    let fill = vec![0xa5u8; sizes.proxying_fill];
    let mut back = vec![0u8; sizes.proxying_fill];
    for stream in &mut conns {
        stream.write_all(&fill).map_err(err("fill write"))?;
        stream.read_exact(&mut back).map_err(err("fill read"))?;
    }
    settle();
    let filled = proxy.rss_bytes();
    let per_conn = |rss: u64| rss.saturating_sub(idle) as f64 / n as f64;
    Ok(vec![
        kib(idle),
        kib(holding),
        per_conn(holding),
        per_conn(filled),
    ])
}

// ----- 5. FIFO -----

/// The permit is held while `n` clients connect one after another, each
/// sending its index and half-closing; then the holder leaves and the
/// recorder upstream logs the order they reach it in.
fn fifo(proxy: Option<&Kind>, up: &Upstreams, n: usize) -> Result<Vec<f64>, String> {
    let (addr, proxy) = launch(proxy, up.recorder, 1)?;
    let proxy = proxy.ok_or("the FIFO scenario needs a proxy")?;
    let recorded = |up: &Upstreams| {
        up.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    };
    up.recorded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let idle_fds = proxy.fd_count();
    let mut holder = connect(addr)?;
    holder
        .write_all(&HOLDER.to_le_bytes())
        .map_err(err("holder write"))?;
    wait_until(ACCEPT_WAIT, || recorded(up) == [HOLDER])
        .map_err(|()| "the holder never reached the recorder".to_owned())?;
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut stream = connect(addr)?;
        let index = u32::try_from(i).map_err(|_| "too many FIFO clients")?;
        stream
            .write_all(&index.to_le_bytes())
            .map_err(err("index write"))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(err("half-close"))?;
        clients.push(stream);
    }
    proxy.wait_for_fds(idle_fds + 2 + n, ACCEPT_WAIT)?;
    drop(holder);
    let _ = wait_until(ACCEPT_WAIT, || recorded(up).len() > n);
    let order: Vec<u32> = recorded(up).into_iter().filter(|&i| i != HOLDER).collect();
    Ok(vec![inversions(&order) as f64, order.len() as f64])
}

/// Pairs served in the opposite order of their arrival.
fn inversions(order: &[u32]) -> u64 {
    let mut count = 0;
    for (i, a) in order.iter().enumerate() {
        count += order[i + 1..].iter().filter(|b| *b < a).count() as u64;
    }
    count
}

// ----- 6. leaving the queue -----

/// One connection holds the single permit and echoes one byte at a time; `k`
/// more queue behind it and then close, newest first. Every close is a client
/// leaving the queue, so the echo's worst round trip shows how long the loop
/// stalls on leaves, and the drain how long `k` leaves take.
fn queue_leave(proxy: Option<&Kind>, upstream: SocketAddr, k: usize) -> Result<Vec<f64>, String> {
    let kind = proxy.ok_or("the queue-leave scenario needs a proxy")?;
    if !matches!(kind, Kind::Tcplock { .. }) {
        return Err("the queue-leave scenario runs tcplock only".to_owned());
    }
    let proxy = Proxy::start_with_queue(kind, upstream, 1, k + 16)?;
    let addr = proxy.addr;
    let idle_fds = proxy.fd_count();
    let holder = proxied_echo(addr, 1)?;
    let mut queued = Vec::with_capacity(k);
    for i in 0..k {
        queued.push(connect(addr).map_err(|e| format!("queued client {i}: {e}"))?);
    }
    proxy.wait_for_fds(idle_fds + 2 + k, ACCEPT_WAIT)?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || echo_round_trips(holder, &stop))
    };
    let cpu = CpuMeter::start(Some(&proxy));
    let user_cpu = proxy.user_cpu_seconds();
    let started = Instant::now();
    while let Some(client) = queued.pop() {
        drop(client);
    }
    let drained = wait_until(ACCEPT_WAIT, || proxy.fd_count() <= idle_fds + 2);
    let drain = started.elapsed();
    let drain_cpu = cpu.seconds();
    let drain_user_cpu = proxy.user_cpu_seconds() - user_cpu;
    // A few more round trips after the drain, so a stall at its very end shows.
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let mut round_trips = echo.join().map_err(|_| "the echo thread panicked")??;
    drained.map_err(|()| format!("the queue did not drain in {ACCEPT_WAIT:?}"))?;
    round_trips.sort_by(f64::total_cmp);
    let worst = round_trips.last().copied().unwrap_or(f64::NAN);
    let p50 = round_trips
        .get(round_trips.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    Ok(vec![
        worst,
        p50,
        drain.as_secs_f64() * 1e3,
        drain_cpu * 1e3,
        drain_user_cpu * 1e3,
    ])
}

// ----- 7. metrics scrape -----

/// Scrapes over one keep-alive connection, for the latency percentiles and
/// the proxy's CPU per scrape (clock ticks are coarse: many scrapes).
const SCRAPES: usize = 1_000;

/// Idle RSS without and with `--metrics`; then one connection holds the
/// single permit, `k` more wait behind it, and `/metrics` is scraped
/// [`SCRAPES`] times: each scrape's round trip (request out, whole response
/// in) and the proxy's CPU time per scrape.
fn scrape(proxy: Option<&Kind>, upstream: SocketAddr, k: usize) -> Result<Vec<f64>, String> {
    let Some(Kind::Tcplock {
        exe,
        log_level,
        extra,
    }) = proxy
    else {
        return Err("the scrape scenario runs tcplock only".to_owned());
    };
    let plain = Proxy::start(proxy.ok_or("no proxy")?, upstream, 1)?;
    settle();
    let idle_plain = plain.rss_bytes();
    drop(plain);
    let metrics_port = crate::proxy::free_port().map_err(err("no free port"))?;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let mut extra = extra.clone();
    extra.extend(["--metrics".to_owned(), metrics_addr.to_string()]);
    let kind = Kind::Tcplock {
        exe: exe.clone(),
        log_level: log_level.clone(),
        extra,
    };
    let proxy = Proxy::start(&kind, upstream, 1)?;
    let addr = proxy.addr;
    settle();
    let idle = proxy.rss_bytes();
    let idle_fds = proxy.fd_count();
    let _holder = proxied_echo(addr, 1)?;
    let mut scraper = connect(metrics_addr)?;
    // One scrape before the queue, so its buffers are grown and counted.
    let first = scrape_once(&mut scraper)?;
    let holding_one = proxy.rss_bytes();
    let mut queued = Vec::with_capacity(k);
    for i in 0..k {
        queued.push(connect(addr).map_err(|e| format!("queued client {i}: {e}"))?);
    }
    proxy.wait_for_fds(idle_fds + 3 + k, ACCEPT_WAIT)?;
    let holding = proxy.rss_bytes();
    let body = scrape_once(&mut scraper)?;
    let queued_line = format!("tcplock_queued_connections {k}\n");
    if !String::from_utf8_lossy(&body).contains(&queued_line) {
        return Err(format!("the scrape does not say `{}`", queued_line.trim()));
    }
    let mut times = Vec::with_capacity(SCRAPES);
    let cpu = CpuMeter::start(Some(&proxy));
    for _ in 0..SCRAPES {
        let started = Instant::now();
        scrape_once(&mut scraper)?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let cpu_per_scrape = cpu.seconds() * 1e6 / SCRAPES as f64;
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    drop(first);
    Ok(vec![
        at(0.5),
        at(0.99),
        cpu_per_scrape,
        kib(body.len() as u64),
        kib(idle_plain),
        kib(idle),
        holding.saturating_sub(holding_one) as f64 / k as f64,
    ])
}

/// One `GET /metrics` on a keep-alive connection; the body.
fn scrape_once(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .map_err(err("scrape write"))?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).map_err(err("scrape read"))?;
        head.push(byte[0]);
        if head.len() > 4096 {
            return Err("scrape: response head too long".to_owned());
        }
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!(
            "scrape: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or("scrape: no Content-Length")?;
    let mut body = vec![0; len];
    stream.read_exact(&mut body).map_err(err("scrape body"))?;
    Ok(body)
}

/// Echoes one byte at a time until `stop`; each round trip in milliseconds.
fn echo_round_trips(mut stream: TcpStream, stop: &AtomicBool) -> Result<Vec<f64>, String> {
    let mut round_trips = Vec::new();
    let mut byte = [7u8];
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        stream.write_all(&byte).map_err(err("echo write"))?;
        stream.read_exact(&mut byte).map_err(err("echo read"))?;
        round_trips.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    Ok(round_trips)
}

// ----- 8. pool -----

/// Tells one run's requests to the pool instances from a late one of an
/// earlier run.
static POOL_RUN: AtomicU32 = AtomicU32::new(1);

/// K instances, each answering one request at a time after the service time,
/// behind one queue with one permit per instance. `n` clients connect one
/// after another (a connect starts when the previous one has completed, so
/// the proxy's accept queue holds them in index order), each sends its run
/// tag and index and half-closes; then their answers are read.
///
/// Metrics: clients served per second (first connect to last answer), the
/// wait from a client's completed connect to its request reaching an
/// instance (kernel receive time: queueing plus the proxy's connect and
/// relay), FIFO inversions (pairs of clients that reached the instances in
/// the opposite order of their connects), clients answered, and how unevenly
/// the instances were used (most requests on one minus fewest).
fn pool(proxy: Option<&Kind>, up: &Upstreams, sizes: &Sizes) -> Result<Vec<f64>, String> {
    let kind = proxy.ok_or("the pool scenario needs a proxy")?;
    let n = sizes.pool_clients;
    let k = up.pool.len();
    if k == 0 {
        return Err("no pool instances were started".to_owned());
    }
    let proxy = Proxy::start_pool(kind, &up.pool, 1)?;
    let run = POOL_RUN.fetch_add(1, Ordering::Relaxed);
    // Serving takes n / k service times; anything far past that is stuck.
    let budget = sizes.pool_service.mul_f64(3.0 * n as f64 / k as f64) + Duration::from_secs(30);
    let mut clients = Vec::with_capacity(n);
    let mut connected = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let mut stream = connect(proxy.addr).map_err(|e| format!("client {i}: {e}"))?;
        connected.push(SystemTime::now());
        let index = u32::try_from(i).map_err(|_| "too many pool clients")?;
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&run.to_le_bytes());
        request[4..].copy_from_slice(&index.to_le_bytes());
        stream.write_all(&request).map_err(err("request write"))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(err("half-close"))?;
        clients.push(stream);
    }
    let deadline = started + budget;
    let mut served = 0usize;
    let mut failures = Vec::new();
    for (i, stream) in clients.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failures.push(format!("client {i}: no answer within {budget:?}"));
            continue;
        }
        let mut answer = [0u8; 4];
        let read = stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.read_exact(&mut answer));
        match read {
            Ok(()) if u32::from_le_bytes(answer) as usize == i => served += 1,
            Ok(()) => failures.push(format!(
                "client {i}: answered {}",
                u32::from_le_bytes(answer)
            )),
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    let elapsed = started.elapsed();
    if let Some(first) = failures.first() {
        eprintln!(
            "  pool: {} of {n} clients unanswered, first: {first}: {}",
            failures.len(),
            proxy.stderr()
        );
    }
    let arrivals: Vec<Arrival> = up
        .arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|a| a.run == run && (a.index as usize) < n)
        .copied()
        .collect();
    if arrivals.iter().any(|a| !a.kernel_stamp) {
        eprintln!("  pool: the kernel gave no receive timestamps: times are the instances' reads");
    }
    let summary = summarize_pool(&arrivals, &connected, k);
    Ok(vec![
        served as f64 / elapsed.as_secs_f64(),
        summary.wait_p50_ms,
        summary.wait_p99_ms,
        summary.inversions as f64,
        summary.late_overtakes as f64,
        served as f64,
        summary.load_spread as f64,
    ])
}

/// What the pool scenario reports of the requests the instances received.
#[derive(Debug, PartialEq)]
pub(crate) struct PoolSummary {
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    pub inversions: u64,
    /// Inversions where the later client arrived more than [`OVERTAKE_MARGIN`]
    /// before the earlier one.
    pub late_overtakes: u64,
    /// Requests on the busiest instance minus those on the idlest.
    pub load_spread: usize,
}

/// An overtake by more than this is one a client could notice, rather than
/// the order of writes within one turn of the proxy's loop (instances that
/// free up together are refilled within tens of microseconds).
const OVERTAKE_MARGIN: Duration = Duration::from_millis(1);

/// Pairs of clients i < j where j reached an instance more than `margin`
/// before i; `by_index` is sorted by client index.
fn overtakes(by_index: &[Arrival], margin: Duration) -> u64 {
    let mut count = 0;
    for (n, earlier) in by_index.iter().enumerate() {
        count += by_index[n + 1..]
            .iter()
            .filter(|later| later.at + margin < earlier.at)
            .count() as u64;
    }
    count
}

/// `arrivals` of one run; `connected[i]`: when client i's connect completed.
pub(crate) fn summarize_pool(
    arrivals: &[Arrival],
    connected: &[SystemTime],
    instances: usize,
) -> PoolSummary {
    let mut sorted = arrivals.to_vec();
    sorted.sort_by_key(|a| a.index);
    let mut waits: Vec<f64> = sorted
        .iter()
        .filter_map(|a| {
            let since = connected.get(a.index as usize)?;
            Some(
                a.at.duration_since(*since)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3,
            )
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    let at = |q: f64| {
        waits
            .get(((waits.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let mut per_instance = vec![0usize; instances];
    for a in arrivals {
        if let Some(count) = per_instance.get_mut(a.instance) {
            *count += 1;
        }
    }
    let most = per_instance.iter().copied().max().unwrap_or(0);
    let fewest = per_instance.iter().copied().min().unwrap_or(0);
    PoolSummary {
        wait_p50_ms: at(0.50),
        wait_p99_ms: at(0.99),
        inversions: overtakes(&sorted, Duration::ZERO),
        late_overtakes: overtakes(&sorted, OVERTAKE_MARGIN),
        load_spread: most - fewest,
    }
}

// ----- helpers -----

/// Starts the proxy (if any) and returns where clients connect.
fn launch(
    kind: Option<&Kind>,
    upstream: SocketAddr,
    permits: usize,
) -> Result<(SocketAddr, Option<Proxy>), String> {
    match kind {
        None => Ok((upstream, None)),
        Some(kind) => {
            let proxy = Proxy::start(kind, upstream, permits)?;
            Ok((proxy.addr, Some(proxy)))
        }
    }
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(err("nodelay"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    Ok(stream)
}

/// A connection that has echoed `bytes` bytes, so it is surely proxying.
fn proxied_echo(addr: SocketAddr, bytes: usize) -> Result<TcpStream, String> {
    let mut stream = connect(addr)?;
    let data = vec![7u8; bytes];
    let mut back = vec![0u8; bytes];
    stream.write_all(&data).map_err(err("write"))?;
    stream.read_exact(&mut back).map_err(err("echo"))?;
    Ok(stream)
}

fn send_bytes(mut stream: &TcpStream, bytes: u64) -> io::Result<()> {
    let buf = vec![0x3cu8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)
}

fn receive_all(mut stream: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn check_count(what: &str, got: u64, want: u64) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} {got} bytes, expected {want}"))
    }
}

/// Proxy CPU time over a stretch of the run (`NaN` without a proxy).
struct CpuMeter<'a> {
    proxy: Option<&'a Proxy>,
    start: f64,
}

impl<'a> CpuMeter<'a> {
    fn start(proxy: Option<&'a Proxy>) -> Self {
        CpuMeter {
            proxy,
            start: proxy.map_or(f64::NAN, Proxy::cpu_seconds),
        }
    }

    fn seconds(&self) -> f64 {
        self.proxy
            .map_or(f64::NAN, |p| p.cpu_seconds() - self.start)
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(());
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Lets the allocator and the kernel's RSS accounting catch up.
fn settle() {
    thread::sleep(Duration::from_millis(300));
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

fn err(what: &'static str) -> impl Fn(io::Error) -> String {
    move |e| format!("{what}: {e}")
}
