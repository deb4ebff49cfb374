#!/bin/sh
# restart-office.sh: a tcplock hook that keeps one headless LibreOffice
# (UNO listener) fresh. Use it as both hooks:
#
#   on-activate = /usr/local/lib/tcplock/restart-office.sh
#   on-timeout  = /usr/local/lib/tcplock/restart-office.sh
#
# Before a connection is let through (TCPLOCK_EVENT=activate) it (re)starts
# the office when
#   - it is not running, or its port does not answer;
#   - TCPLOCK_ACTIVATIONS is a multiple of RESTART_EVERY (0, 20, 40, ...):
#     the first client starts it, and each instance serves RESTART_EVERY
#     connections, which bounds how much a leaking office can grow;
#   - the last connection overstayed its timeout (TCPLOCK_LAST_OUTCOME=timeout)
#     and no restart has happened since.
# After a connection's timeout (TCPLOCK_EVENT=timeout) it restarts at once:
# an office that hung once is not trusted with the next document.
#
# Then it waits (at most OFFICE_START_WAIT seconds) until the port answers and
# exits 0; otherwise it exits 1 and tcplock retries with a backoff while the
# client keeps its place in the queue. tcplock runs one hook at a time, so no
# locking is needed here. Keep tcplock's hook-timeout above
# OFFICE_STOP_WAIT + OFFICE_START_WAIT.
#
# Settings (environment; all optional):
#   OFFICE_HOST        address the office listens on    (127.0.0.1)
#   OFFICE_PORT        UNO port                          (2002)
#   OFFICE_CMD         shell command that runs the office in the foreground
#                      (soffice --headless ... --accept=socket,...;urp;)
#   OFFICE_STATE_DIR   private directory for the pid file and the office's
#                      output (${XDG_RUNTIME_DIR:-/tmp}/tcplock-office-UID)
#   RESTART_EVERY      connections per office instance   (20)
#   OFFICE_START_WAIT  seconds to wait for the port      (30)
#   OFFICE_STOP_WAIT   seconds before SIGKILL on restart (10)
#
# Client data: this script reads only counters and outcome names from
# tcplock's environment. It never uses TCPLOCK_CLIENT_ADDR, never evaluates a
# TCPLOCK_* value, and writes only to its own private state directory.
set -eu

OFFICE_HOST=${OFFICE_HOST:-127.0.0.1}
OFFICE_PORT=${OFFICE_PORT:-2002}
OFFICE_CMD=${OFFICE_CMD:-"soffice --headless --invisible --nologo --norestore --accept='socket,host=$OFFICE_HOST,port=$OFFICE_PORT;urp;'"}
OFFICE_STATE_DIR=${OFFICE_STATE_DIR:-${XDG_RUNTIME_DIR:-/tmp}/tcplock-office-$(id -u)}
RESTART_EVERY=${RESTART_EVERY:-20}
OFFICE_START_WAIT=${OFFICE_START_WAIT:-30}
OFFICE_STOP_WAIT=${OFFICE_STOP_WAIT:-10}

EVENT=${TCPLOCK_EVENT:-activate}
ACTIVATIONS=${TCPLOCK_ACTIVATIONS:-0}
TIMEOUTS=${TCPLOCK_TIMEOUTS:-0}
LAST_OUTCOME=${TCPLOCK_LAST_OUTCOME:-none}

PIDFILE=$OFFICE_STATE_DIR/office.pid
# TCPLOCK_TIMEOUTS as of the last restart: a timeout already answered by a
# restart (say by the on-timeout hook) does not restart the office again.
HANDLED=$OFFICE_STATE_DIR/timeouts-handled

say() {
    echo "restart-office: $*" >&2
}

is_number() {
    case $1 in
        '' | *[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

# Sleeps a fraction of a second where sleep(1) allows it, else a second.
nap() {
    sleep 0.2 2>/dev/null || sleep 1
}

# Whether something accepts TCP connections on the office port.
port_answers() {
    if command -v bash >/dev/null 2>&1; then
        bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$OFFICE_HOST" "$OFFICE_PORT" >/dev/null 2>&1
    elif command -v nc >/dev/null 2>&1; then
        nc -z -w 1 "$OFFICE_HOST" "$OFFICE_PORT" >/dev/null 2>&1
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()' \
            "$OFFICE_HOST" "$OFFICE_PORT" >/dev/null 2>&1
    else
        say "need bash, nc or python3 to probe port $OFFICE_PORT"
        return 1
    fi
}

# Whether process PID exists and has not exited. Where /proc is available, an
# exited process that its parent has not reaped yet (a zombie) counts as gone.
alive() {
    kill -s 0 -- "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        state=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
        state=${state##*) }
        [ "${state%% *}" != Z ] || return 1
    fi
    return 0
}

# The recorded office pid, if that process still runs.
running_pid() {
    [ -s "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE")
    is_number "$pid" || return 1
    alive "$pid" || return 1
    echo "$pid"
}

# SIGTERM to the office (its whole process group when it leads one: soffice
# is a wrapper around soffice.bin), a wait of at most OFFICE_STOP_WAIT seconds
# until it is gone and its port is free, then SIGKILL for whatever is left.
stop_office() {
    pid=$(running_pid) || { rm -f "$PIDFILE"; return 0; }
    target=$pid
    if kill -s 0 -- "-$pid" 2>/dev/null; then
        target=-$pid
    fi
    say "stopping office pid $pid"
    kill -s TERM -- "$target" 2>/dev/null || true
    tries=$((OFFICE_STOP_WAIT * 5))
    while { alive "$pid" || port_answers; } && [ "$tries" -gt 0 ]; do
        nap
        tries=$((tries - 1))
    done
    if [ "$tries" -le 0 ]; then
        say "office pid $pid still there after ${OFFICE_STOP_WAIT}s; killing it"
    fi
    kill -s KILL -- "$target" 2>/dev/null || true
    rm -f "$PIDFILE"
}

start_office() {
    say "starting office on $OFFICE_HOST:$OFFICE_PORT ($1)"
    # Its own session and process group where setsid(1) exists, so a restart
    # can stop the whole office tree and a hook timeout does not take it down.
    # Output goes to the state directory, not into tcplock's log.
    if command -v setsid >/dev/null 2>&1; then
        setsid sh -c "exec $OFFICE_CMD" </dev/null >>"$OFFICE_STATE_DIR/office.log" 2>&1 &
    else
        sh -c "exec $OFFICE_CMD" </dev/null >>"$OFFICE_STATE_DIR/office.log" 2>&1 &
    fi
    pid=$!
    echo "$pid" >"$PIDFILE.tmp"
    mv "$PIDFILE.tmp" "$PIDFILE"
    echo "$TIMEOUTS" >"$HANDLED"

    tries=$((OFFICE_START_WAIT * 5))
    until port_answers; do
        if ! alive "$pid"; then
            say "office exited before its port answered; see $OFFICE_STATE_DIR/office.log"
            rm -f "$PIDFILE"
            exit 1
        fi
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            say "port $OFFICE_PORT did not answer within ${OFFICE_START_WAIT}s"
            stop_office
            exit 1
        fi
        nap
    done
    say "office pid $pid answers on port $OFFICE_PORT"
}

# A private state directory: created 0700, and refused if it is a symlink or
# belongs to someone else (a shared /tmp must not steer our pid file).
umask 077
mkdir -p "$OFFICE_STATE_DIR"
if [ -L "$OFFICE_STATE_DIR" ] || [ ! -d "$OFFICE_STATE_DIR" ] ||
    [ "$(ls -ldn "$OFFICE_STATE_DIR" | awk '{ print $3 }')" != "$(id -u)" ]; then
    say "unsafe state directory $OFFICE_STATE_DIR (not a directory of our own)"
    exit 1
fi

for value in "$ACTIVATIONS" "$TIMEOUTS" "$RESTART_EVERY" "$OFFICE_START_WAIT" "$OFFICE_STOP_WAIT"; do
    if ! is_number "$value"; then
        say "not a number: '$value'"
        exit 1
    fi
done
[ "$RESTART_EVERY" -gt 0 ] || RESTART_EVERY=1

handled=$(cat "$HANDLED" 2>/dev/null || echo 0)
is_number "$handled" || handled=0

reason=
if [ "$EVENT" = timeout ]; then
    reason="a connection timed out"
elif ! running_pid >/dev/null; then
    reason="not running"
elif [ $((ACTIVATIONS % RESTART_EVERY)) -eq 0 ]; then
    reason="$ACTIVATIONS connections served"
elif [ "$LAST_OUTCOME" = timeout ] && [ "$handled" -lt "$TIMEOUTS" ]; then
    reason="the last connection timed out"
elif ! port_answers; then
    reason="port $OFFICE_PORT does not answer"
fi

if [ -n "$reason" ]; then
    stop_office
    start_office "$reason"
fi
exit 0
