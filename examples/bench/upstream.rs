//! The upstream stand-ins, each a listener on 127.0.0.1:0 served by a fixed
//! pool of blocking worker threads (one connection per worker at a time):
//!
//! - echo: writes back what it reads; half-closes after the client's EOF.
//! - sink: reads until EOF, then answers the byte count as a `u64` (LE).
//! - source: reads a `u64` length (LE), sends that many bytes, half-closes.
//! - recorder: reads a `u32` (LE), appends it to a shared list, drains to EOF.
//!   One worker, so the list is in the order the connections reached it.
//!
//! Every accepted socket has read and write timeouts, so no worker can hang
//! forever; the workers themselves live until the bench process exits.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

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
}

/// Starts all four upstreams; `echo_workers` bounds how many echo connections
/// are served at once (the rest wait in the listen backlog).
pub fn start(echo_workers: usize) -> io::Result<Upstreams> {
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let list = Arc::clone(&recorded);
    Ok(Upstreams {
        echo: serve("echo", echo_workers, echo)?,
        sink: serve("sink", 4, sink)?,
        source: serve("source", 4, source)?,
        recorder: serve("recorder", 1, move |s| record(s, &list))?,
        recorded,
    })
}

fn serve<F>(name: &str, workers: usize, handler: F) -> io::Result<SocketAddr>
where
    F: Fn(TcpStream) -> io::Result<()> + Send + Sync + 'static,
{
    let listener = Arc::new(TcpListener::bind("127.0.0.1:0")?);
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
