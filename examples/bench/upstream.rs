//! The upstream stand-ins, each a listener on 127.0.0.1:0 served by a fixed
//! pool of blocking worker threads (one connection per worker at a time):
//!
//! - echo: writes back what it reads; half-closes after the client's EOF.
//! - sink: reads until EOF, then answers the byte count as a `u64` (LE).
//! - source: reads a `u64` length (LE), sends that many bytes, half-closes.
//! - recorder: reads a `u32` (LE), appends it to a shared list, drains to EOF.
//!   One worker, so the list is in the order the connections reached it.
//! - pool: K instances, each one worker (one request at a time): reads a run
//!   tag and a client index (`u32` LE each), records them with the kernel's
//!   receive time of those bytes, answers the index after the service time,
//!   half-closes and drains.
//!
//! Every accepted socket has read and write timeouts, so no worker can hang
//! forever; the workers themselves live until the bench process exits.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Read/write timeout on every upstream socket. Longer than any idle phase of
/// a scenario (the proxying-memory scenario holds connections idle).
const IO_TIMEOUT: Duration = Duration::from_secs(120);
const CHUNK: usize = 64 * 1024;
const STACK: usize = 256 * 1024;

/// Addresses of the running upstreams, and the recorder's list.
pub struct Upstreams {
    pub echo: SocketAddr,
    pub sink: SocketAddr,
    pub source: SocketAddr,
    pub recorder: SocketAddr,
    pub recorded: Arc<Mutex<Vec<u32>>>,
    /// The pool scenario's instances, 1..K in this order.
    pub pool: Vec<SocketAddr>,
    /// Every request the pool instances received, in no particular order.
    pub arrivals: Arc<Mutex<Vec<Arrival>>>,
}

/// One request as a pool instance saw it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// The run tag the client sent: arrivals of other runs are ignored.
    pub run: u32,
    pub index: u32,
    /// 0-based position of the instance in [`Upstreams::pool`].
    pub instance: usize,
    /// When the request's bytes reached the instance's socket: the kernel's
    /// receive timestamp (`SO_TIMESTAMPNS`), so it is the proxy's send order
    /// and not the order in which the instances' threads got a core.
    pub at: SystemTime,
    /// False where the kernel gave no timestamp and `at` is the time the
    /// instance's thread read the bytes.
    pub kernel_stamp: bool,
}

/// Starts the echo, sink, source and recorder upstreams and `pool_instances`
/// pool instances taking `pool_service` per request; `echo_workers` bounds
/// how many echo connections are served at once (the rest wait in the listen
/// backlog).
pub fn start(
    echo_workers: usize,
    pool_instances: usize,
    pool_service: Duration,
) -> io::Result<Upstreams> {
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let list = Arc::clone(&recorded);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let mut pool = Vec::with_capacity(pool_instances);
    for instance in 0..pool_instances {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        // Set on the listener, so every accepted socket inherits it and the
        // kernel stamps the request's segment as it arrives.
        enable_receive_timestamps(&listener)?;
        let log = Arc::clone(&arrivals);
        let handler = move |s| pool_instance(s, instance, pool_service, &log);
        pool.push(serve_on(
            &format!("pool{}", instance + 1),
            listener,
            1,
            handler,
        )?);
    }
    Ok(Upstreams {
        echo: serve("echo", echo_workers, echo)?,
        sink: serve("sink", 4, sink)?,
        source: serve("source", 4, source)?,
        recorder: serve("recorder", 1, move |s| record(s, &list))?,
        recorded,
        pool,
        arrivals,
    })
}

fn serve<F>(name: &str, workers: usize, handler: F) -> io::Result<SocketAddr>
where
    F: Fn(TcpStream) -> io::Result<()> + Send + Sync + 'static,
{
    serve_on(name, TcpListener::bind("127.0.0.1:0")?, workers, handler)
}

fn serve_on<F>(
    name: &str,
    listener: TcpListener,
    workers: usize,
    handler: F,
) -> io::Result<SocketAddr>
where
    F: Fn(TcpStream) -> io::Result<()> + Send + Sync + 'static,
{
    let listener = Arc::new(listener);
    let addr = listener.local_addr()?;
    let handler = Arc::new(handler);
    for i in 0..workers {
        let listener = Arc::clone(&listener);
        let handler = Arc::clone(&handler);
        thread::Builder::new()
            .name(format!("{name}-{i}"))
            .stack_size(STACK)
            .spawn(move || {
                loop {
                    let Ok((stream, _)) = listener.accept() else {
                        // EMFILE and friends: back off instead of spinning.
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    // A failed connection concerns that client only.
                    let _ = handler(stream);
                }
            })?;
    }
    Ok(addr)
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => stream.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.shutdown(Shutdown::Write)
}

fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.write_all(&total.to_le_bytes())?;
    stream.shutdown(Shutdown::Write)
}

fn source(mut stream: TcpStream) -> io::Result<()> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let mut left = u64::from_le_bytes(len);
    let buf = vec![0x5au8; CHUNK];
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    drain(&mut stream)
}

fn record(mut stream: TcpStream, list: &Mutex<Vec<u32>>) -> io::Result<()> {
    let mut index = [0u8; 4];
    stream.read_exact(&mut index)?;
    list.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(u32::from_le_bytes(index));
    drain(&mut stream)
}

/// One request of the pool scenario: run tag and index in, recorded with
/// their arrival time, the index back after `service`.
fn pool_instance(
    mut stream: TcpStream,
    instance: usize,
    service: Duration,
    log: &Mutex<Vec<Arrival>>,
) -> io::Result<()> {
    let mut request = [0u8; 8];
    let stamp = read_stamped(&stream, &mut request)?;
    let [r0, r1, r2, r3, i0, i1, i2, i3] = request;
    let index = [i0, i1, i2, i3];
    log.lock().unwrap_or_else(|e| e.into_inner()).push(Arrival {
        run: u32::from_le_bytes([r0, r1, r2, r3]),
        index: u32::from_le_bytes(index),
        instance,
        at: stamp.unwrap_or_else(SystemTime::now),
        kernel_stamp: stamp.is_some(),
    });
    thread::sleep(service);
    stream.write_all(&index)?;
    stream.shutdown(Shutdown::Write)?;
    drain(&mut stream)
}

fn enable_receive_timestamps(listener: &TcpListener) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the fd is open for the duration of the call and `on` is a valid
    // c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Fills `buf` from a blocking socket with `recvmsg`; returns the kernel's
/// receive timestamp of the first bytes, when it sent one (`SO_TIMESTAMPNS`).
fn read_stamped(stream: &TcpStream, buf: &mut [u8]) -> io::Result<Option<SystemTime>> {
    let mut got = 0;
    let mut stamp = None;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let mut iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // u64s, so the control buffer is aligned for cmsghdr.
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data (pointers and integers, some private
        // padding on some targets): all zeroes is a valid, empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` points at `iov` (into `rest`) and `control`, all alive
        // and writable for the lengths given until the call returns.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if stamp.is_none() {
            stamp = timestamp(&msg);
        }
        got += n as usize;
    }
    Ok(stamp)
}

/// The `SCM_TIMESTAMPNS` control message of a received `msg`, if any.
fn timestamp(msg: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: `msg` was filled by recvmsg: its control pointer and length
    // describe the buffer the kernel wrote, which the CMSG_* walk stays in.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null headers from CMSG_FIRSTHDR/NXTHDR lie inside the
        // control buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_TIMESTAMPNS {
            // SAFETY: the data of an SCM_TIMESTAMPNS message is one timespec
            // inside the control buffer; read unaligned.
            let ts: libc::timespec =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            let secs = u64::try_from(ts.tv_sec).ok()?;
            let nanos = u32::try_from(ts.tv_nsec).ok()?;
            return Some(UNIX_EPOCH + Duration::new(secs, nanos));
        }
        // SAFETY: as above: `cmsg` is a header inside `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// Reads and discards until EOF.
fn drain(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
