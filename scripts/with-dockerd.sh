#!/bin/sh
# Runs the command given (the test suite) with a Docker daemon for the docker tests: as root,
# when dockerd is installed and no daemon answers, it starts one for the run (no iptables and no
# bridge: the tests' containers use the host network; docker keeps its data where it always
# does) and stops that one, by its PID, when the command ends, also on failure or interruption.
# Otherwise the command runs as it is, and the docker tests skip.
set -u
pid=""
log="${TMPDIR:-/tmp}/mistrelay-test-dockerd.log"

stop_dockerd() {
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 60 ]; do
        sleep 0.5
        tries=$((tries + 1))
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=""
}

daemon_answers() {
    docker info >/dev/null 2>&1
}

if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 \
    && ! daemon_answers; then
    trap stop_dockerd EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    dockerd --iptables=false --bridge=none >"$log" 2>&1 &
    pid=$!
    echo "started dockerd (PID $pid, log $log) for the docker tests"
    tries=0
    until daemon_answers; do
        tries=$((tries + 1))
        if [ "$tries" -gt 60 ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "dockerd did not start (see $log): the docker tests will skip" >&2
            stop_dockerd
            break
        fi
        sleep 0.5
    done
fi

"$@"
status=$?
stop_dockerd
exit "$status"
