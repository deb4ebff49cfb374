//! `tcplock ctl`: the control socket's client, in the same binary. It sends
//! one command line, prints the reply as it comes, and turns its last line
//! into the exit status.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::config::cli::{CtlArgs, CtlSocket};
use crate::config::file::{parse_file, read_config_file};

/// The reply ended with `ok`.
pub const EXIT_OK: u8 = 0;
/// The reply ended with `error msg=...` (or broke off).
pub const EXIT_ERROR: u8 = 1;
/// The command line of `ctl` itself is wrong, or `-c FILE` names no socket.
pub const EXIT_USAGE: u8 = 2;
/// Nothing listens at the control socket's path.
pub const EXIT_CONNECT: u8 = 3;

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
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!(
                "tcplock ctl: cannot connect to control socket {}: {e}",
                path.display()
            );
            return EXIT_CONNECT;
        }
    };
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
