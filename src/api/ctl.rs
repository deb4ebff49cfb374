//! `tcplock ctl`: the control socket's client, in the same binary. It sends
//! one command line, prints the reply as it comes, and turns its last line
//! into the exit status.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::config::cli::{CtlArgs, CtlSocket};
use crate::config::file::{parse_file, read_config_file};
use crate::shell::{Command, parse_line};

/// The reply ended with `ok`.
pub const EXIT_OK: u8 = 0;
/// The reply ended with `error msg=...` (or broke off).
pub const EXIT_ERROR: u8 = 1;
/// The command line of `ctl` itself is wrong, or `-c FILE` names no socket.
pub const EXIT_USAGE: u8 = 2;
/// Nothing listens at the control socket's path.
pub const EXIT_CONNECT: u8 = 3;

/// How long connecting, sending, and each part of a reply may take: a
/// wedged or stopped tcplock makes `ctl` fail instead of hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// `reload` and `restart` answer once the reload ran or the new generation
/// is ready: they may wait this long for it.
pub const LONG_WAIT: Duration = Duration::from_secs(300);

/// How long `command` may wait for each part of its reply; `None` (no
/// limit) for a `drain` without a time limit, which waits as long as the
/// permits are held. A `drain DUR` waits its `DUR` and [`IO_TIMEOUT`] more.
/// The command is read by the control server's own parser: one it refuses
/// is answered at once.
pub fn reply_timeout(command: &str) -> Option<Duration> {
    match parse_line(command.as_bytes()) {
        Ok(Command::Drain(None)) => None,
        Ok(Command::Drain(Some(ms))) => Some(Duration::from_millis(ms).saturating_add(IO_TIMEOUT)),
        Ok(Command::Reload | Command::Restart(_)) => Some(LONG_WAIT),
        _ => Some(IO_TIMEOUT),
    }
}

/// Connects within [`IO_TIMEOUT`]: a stopped tcplock whose backlog is full
/// would keep `connect` waiting. The connecting thread is left behind on a
/// timeout; `ctl` exits then.
fn connect(path: &Path) -> io::Result<UnixStream> {
    let (tx, rx) = mpsc::channel();
    let owned = path.to_owned();
    std::thread::Builder::new()
        .name("tcplock-ctl-connect".to_string())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(owned));
        })?;
    rx.recv_timeout(IO_TIMEOUT).unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", IO_TIMEOUT.as_secs()),
        ))
    })
}

/// Runs one `ctl` command, printing the reply to `out` and problems to
/// stderr; returns the exit status.
pub fn run(args: &CtlArgs, out: &mut impl Write) -> u8 {
    let path = match socket_path(&args.socket) {
        Ok(path) => path,
        Err(message) => {
            eprintln!("tcplock ctl: {message}");
            return EXIT_USAGE;
        }
    };
    let mut stream = match connect(&path) {
        Ok(stream) => stream,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            eprintln!(
                "tcplock ctl: cannot connect to control socket {}: {e}: is tcplock stopped or wedged?",
                path.display()
            );
            return EXIT_ERROR;
        }
        Err(e) => {
            eprintln!(
                "tcplock ctl: cannot connect to control socket {}: {e}",
                path.display()
            );
            return EXIT_CONNECT;
        }
    };
    let timeout = reply_timeout(&args.command);
    if let Err(e) = stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(timeout))
    {
        eprintln!("tcplock ctl: cannot set timeouts: {e}");
        return EXIT_ERROR;
    }
    // A server that refused the connection (too many) may have closed it
    // before the command went out: its error line is still there to read.
    let sent = stream.write_all(format!("{}\n", args.command).as_bytes());
    let mut last = String::new();
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(line) => {
                if writeln!(out, "{line}").is_err() {
                    return EXIT_ERROR;
                }
                last = line;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The error line came: what the close did after it is no news.
            Err(_) if last.starts_with("error") => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                eprintln!(
                    "tcplock ctl: no reply from {} within {} s: is tcplock stopped or wedged?",
                    path.display(),
                    timeout.unwrap_or(IO_TIMEOUT).as_secs()
                );
                return EXIT_ERROR;
            }
            Err(e) => {
                match &sent {
                    Err(e) => eprintln!("tcplock ctl: cannot send to {}: {e}", path.display()),
                    Ok(()) => eprintln!("tcplock ctl: reading the reply failed: {e}"),
                }
                return EXIT_ERROR;
            }
        }
    }
    if let Err(e) = &sent
        && last.is_empty()
    {
        eprintln!("tcplock ctl: cannot send to {}: {e}", path.display());
        return EXIT_ERROR;
    }
    if last == "ok" {
        EXIT_OK
    } else {
        if !last.starts_with("error") {
            eprintln!("tcplock ctl: the reply broke off before ok or error");
        }
        EXIT_ERROR
    }
}

/// The socket's path: given, or the `control` key of a config file read
/// with the same reader (and the same checks) as `tcplock -c`.
fn socket_path(socket: &CtlSocket) -> Result<PathBuf, String> {
    match socket {
        CtlSocket::Path(path) => Ok(PathBuf::from(path)),
        CtlSocket::ConfigFile(file) => {
            let file = PathBuf::from(file);
            let text = read_config_file(&file).map_err(|e| e.to_string())?;
            let parsed = parse_file(&text, &file).map_err(|e| e.to_string())?;
            parsed
                .get("control")
                .map(PathBuf::from)
                .ok_or_else(|| format!("{} sets no control socket (key control)", file.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_wait_10s_but_drain_and_reload_and_restart_longer() {
        assert_eq!(reply_timeout("status"), Some(IO_TIMEOUT));
        assert_eq!(reply_timeout("kill 3"), Some(IO_TIMEOUT));
        assert_eq!(reply_timeout("drain"), None);
        assert_eq!(
            reply_timeout("drain 2m"),
            Some(Duration::from_secs(120) + IO_TIMEOUT)
        );
        assert_eq!(reply_timeout("drain soon"), Some(IO_TIMEOUT));
        assert_eq!(reply_timeout("reload"), Some(LONG_WAIT));
        assert_eq!(reply_timeout("restart 1"), Some(LONG_WAIT));
    }
}
