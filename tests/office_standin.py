#!/usr/bin/env python3
"""A stand-in for `soffice --headless --accept=socket,...`, for the tests of
`tcplock --spawn`. It behaves like the real office where a supervisor can get
it wrong:

* The spawned process is a wrapper (as `soffice` is a shell script around
  `oosplash`, itself a wrapper around `soffice.bin`): it forks the real
  server, waits for it and exits with its status. It ignores SIGTERM (the
  server must be signalled itself), unless --wrapper-dies-on-term.
* The server listens on TCPLOCK_UPSTREAM_PORT (or --port) only after
  --startup-delay seconds, so a supervisor that lets clients in before the
  port answers is caught.
* Each served connection (one that sent a byte; a readiness probe sends
  none) grows the server's resident memory by --grow-mib MiB, pages touched.
* On SIGTERM the server exits after --term-delay seconds (-1: never; only
  SIGKILL ends it).
* A second copy that finds one already running (the lock file of --state
  is held) hands off to it and exits 0 at once, as `soffice` does, without
  starting a server.
* --state DIR/fail existing makes the wrapper exit 1 at once (a start that
  fails); the line `CRASH` makes the server exit 3 at once.

Protocol of the server: it echoes every byte back, except that a line
`WHO` is answered with `gen=G pid=P n=N inst=I` (N: connections served by
this server so far, this one included; I: TCPLOCK_INSTANCE, `-` if unset)
and a line `CRASH` ends the server.

Everything seen goes to DIR/events, one `ev=NAME key=value ...` line per
event, appended with one write each, for the tests to read.
"""

import argparse
import fcntl
import os
import signal
import socket
import sys
import threading
import time

MIB = 1024 * 1024


def options():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state", required=True, help="directory for events and the lock")
    p.add_argument("--host", default=os.environ.get("TCPLOCK_UPSTREAM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("TCPLOCK_UPSTREAM_PORT", "0")))
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--grow-mib", type=int, default=0)
    p.add_argument("--term-delay", type=float, default=0.0)
    p.add_argument("--wrapper-dies-on-term", action="store_true")
    p.add_argument("--tag", default="-", help="shown in the events, to tell configs apart")
    p.add_argument("--say", default="", help="a line to print on stdout and stderr at start")
    return p.parse_args()


OPTS = None
GEN = os.environ.get("TCPLOCK_GENERATION", "0")
REASON = os.environ.get("TCPLOCK_RESTART_REASON", "-")
INSTANCE = os.environ.get("TCPLOCK_INSTANCE", "-")


def record(ev, **fields):
    parts = ["ev=" + ev, "pid=%d" % os.getpid(), "gen=" + GEN, "tag=" + OPTS.tag, "inst=" + INSTANCE]
    parts += ["%s=%s" % (k, v) for k, v in fields.items()]
    line = (" ".join(parts) + "\n").encode()
    fd = os.open(os.path.join(OPTS.state, "events"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def rss_kib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


# ---------------------------------------------------------------------------
# The server (soffice.bin)
# ---------------------------------------------------------------------------

class Server:
    def __init__(self):
        self.served = 0
        self.lock = threading.Lock()
        self.hoard = []

    def serve(self, conn):
        conn.settimeout(120)
        counted = False
        buf = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                if not counted:
                    counted = True
                    with self.lock:
                        self.served += 1
                        n = self.served
                        if OPTS.grow_mib:
                            # bytes filled with a non-zero byte: every page touched.
                            self.hoard.append(b"\x5a" * (OPTS.grow_mib * MIB))
                    record("conn", n=n, rss_kib=rss_kib())
                buf += data
                out = b""
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    word = line.strip()
                    if word == b"WHO":
                        out += ("gen=%s pid=%d n=%d inst=%s\n" % (GEN, os.getpid(), n, INSTANCE)).encode()
                    elif word == b"CRASH":
                        record("crash")
                        os._exit(3)
                    else:
                        out += line + b"\n"
                if out:
                    conn.sendall(out)
            if buf:
                conn.sendall(buf)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def run(self):
        record("server_start", ppid=os.getppid(), sid=os.getsid(0))

        def on_term(_sig, _frame):
            record("term", who="server")
            if OPTS.term_delay < 0:
                return
            t = threading.Timer(OPTS.term_delay, lambda: (record("server_exit", status="term"), os._exit(0)))
            t.daemon = True
            t.start()

        signal.signal(signal.SIGTERM, on_term)
        if OPTS.startup_delay > 0:
            time.sleep(OPTS.startup_delay)
        listener = socket.socket(socket.AF_INET6 if ":" in OPTS.host else socket.AF_INET)
        # As soffice's acceptor does: a connection of a killed predecessor in
        # TIME_WAIT must not block the port; a live listener still does.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((OPTS.host, OPTS.port))
        except OSError as e:
            record("port_busy", error=str(e.errno))
            os._exit(2)
        listener.listen(64)
        record("listening", port=OPTS.port)
        while True:
            try:
                conn, _ = listener.accept()
            except InterruptedError:
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()


# ---------------------------------------------------------------------------
# The wrapper (soffice / oosplash)
# ---------------------------------------------------------------------------

def main():
    global OPTS
    OPTS = options()
    if OPTS.say:
        print(OPTS.say, flush=True)
        print(OPTS.say, file=sys.stderr, flush=True)
    record("wrapper_start", reason=REASON, sid=os.getsid(0), ppid=os.getppid(),
           notify=os.environ.get("NOTIFY_SOCKET", "-"))
    if os.path.exists(os.path.join(OPTS.state, "fail")):
        record("fail_start")
        sys.exit(1)
    # The lock is taken on an open file description the server inherits, so
    # it is held for as long as the server lives, wrapper or no wrapper.
    lock_fd = os.open(os.path.join(OPTS.state, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # soffice: "an office is already running; passing the request on".
        record("handoff")
        sys.exit(0)
    def on_term(_sig, _frame):
        record("term", who="wrapper")
        if OPTS.wrapper_dies_on_term:
            record("wrapper_exit", status="term")
            os._exit(0)

    # Before the fork, so no SIGTERM finds the wrapper without it; the
    # server sets its own.
    signal.signal(signal.SIGTERM, on_term)
    server = os.fork()
    if server == 0:
        try:
            Server().run()
        finally:
            os._exit(1)
    os.close(lock_fd)
    while True:
        try:
            _, status = os.waitpid(server, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    record("wrapper_exit", server=server, status=code)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
