#!/usr/bin/env bash
# Makes sure a Kafka-protocol broker answers on 127.0.0.1:9092 for the
# relay tests: tansu (Apache-2.0, from crates.io) with in-memory storage.
# Reuses a broker that already listens there; otherwise installs tansu when
# it is missing (about 8 minutes once; the binary stays in ~/.cargo/bin for
# the next run) and starts it in the background. It stops nothing, and what
# it starts it leaves running for the next run. (The apt packages the
# bundled librdkafka build needs come from ensure-services.sh.)
set -euo pipefail

KAFKA_PORT=${EVENTPLANE_KAFKA_PORT:-9092}
TANSU_VERSION=0.6.0
LOG_DIR=${EVENTPLANE_KAFKA_LOG_DIR:-/var/log/eventplane}

log() { echo "ensure-kafka: $*"; }
die() { echo "ensure-kafka: error: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

if port_open "$KAFKA_PORT"; then
    log "reused the broker on 127.0.0.1:$KAFKA_PORT"
    exit 0
fi

if ! command -v tansu >/dev/null ||
    ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    command -v cargo >/dev/null || die "cargo not found; it is needed to install tansu"
    log "installing tansu $TANSU_VERSION with cargo install (about 8 minutes, once)"
    cargo install --quiet "tansu@$TANSU_VERSION" --locked --features dynostore,postgres ||
        die "cargo install tansu failed"
fi

mkdir -p "$LOG_DIR" 2>/dev/null || LOG_DIR=/tmp
[ -w "$LOG_DIR" ] || LOG_DIR=/tmp
logfile=$LOG_DIR/tansu.log
# setsid: the broker outlives this script and the test run's process group.
setsid tansu broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ \
    >>"$logfile" 2>&1 </dev/null &
pid=$!
for _ in $(seq 1 60); do
    port_open "$KAFKA_PORT" && break
    kill -0 "$pid" 2>/dev/null || die "tansu exited at start; see $logfile"
    sleep 0.5
done
port_open "$KAFKA_PORT" || die "tansu started but does not listen on 127.0.0.1:$KAFKA_PORT; see $logfile"
log "started tansu (pid $pid) on 127.0.0.1:$KAFKA_PORT, log $logfile"
