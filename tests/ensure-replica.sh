#!/usr/bin/env bash
# Makes sure a streaming replica of the local Postgres answers on
# 127.0.0.1:5433 for the read-replica tests. Reuses one that already
# answers; otherwise makes it with pg_basebackup -R and starts it. It stops
# nothing, and what it makes it leaves running for the next run.
#
# The replica applies WAL with a delay (recovery_min_apply_delay, 50 ms by
# default, EVENTPLANE_REPLICA_DELAY to change it when it is made), so a read
# that does not wait for its token really can miss a write there.
set -euo pipefail

PRIMARY_PORT=5432
REPLICA_PORT=${EVENTPLANE_REPLICA_PORT:-5433}
REPLICA_DIR=${EVENTPLANE_REPLICA_DIR:-/var/lib/postgresql/eventplane-replica}
DELAY=${EVENTPLANE_REPLICA_DELAY:-50ms}

log() { echo "ensure-replica: $*"; }
die() { echo "ensure-replica: error: $*" >&2; exit 1; }

replica_answers() {
    [ "$(psql -h 127.0.0.1 -p "$REPLICA_PORT" -U postgres -d postgres -Atqc 'select pg_is_in_recovery()' 2>/dev/null)" = t ]
}

if replica_answers; then
    log "reused the replica on 127.0.0.1:$REPLICA_PORT"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "making the replica needs root (it runs as the postgres user)"

ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
[ -n "$ver" ] || die "no local Postgres cluster under /etc/postgresql"
bin=/usr/lib/postgresql/$ver/bin
hba=/etc/postgresql/$ver/main/pg_hba.conf
as_postgres() { runuser -u postgres -- "$@"; }

# Replication connections match only lines naming `replication`.
if ! grep -q '^# eventplane: replication on loopback' "$hba"; then
    {
        echo '# eventplane: replication on loopback (tests only)'
        echo 'host    replication   all   127.0.0.1/32   trust'
        cat "$hba"
    } >"$hba.new"
    cat "$hba.new" >"$hba"
    rm -f "$hba.new"
    psql -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres -Atqc 'select pg_reload_conf()' >/dev/null
    log "allowed replication from loopback in $hba"
fi

if [ -f "$REPLICA_DIR/PG_VERSION" ] && [ -f "$REPLICA_DIR/standby.signal" ]; then
    log "starting the replica in $REPLICA_DIR"
else
    rm -rf "$REPLICA_DIR"
    mkdir -p "$REPLICA_DIR"
    chown postgres:postgres "$REPLICA_DIR"
    chmod 700 "$REPLICA_DIR"
    as_postgres "$bin/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres \
        -D "$REPLICA_DIR" -R -X stream -c fast
    # Debian keeps the primary's configuration outside its data directory,
    # so the copy has none: give it its own.
    cat >"$REPLICA_DIR/postgresql.conf" <<EOF
port = $REPLICA_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
hba_file = '$REPLICA_DIR/pg_hba.conf'
hot_standby = on
recovery_min_apply_delay = '$DELAY'
max_connections = 200
shared_buffers = 64MB
EOF
    cat >"$REPLICA_DIR/pg_hba.conf" <<EOF
local   all   all                  trust
host    all   all   127.0.0.1/32   trust
EOF
    chown postgres:postgres "$REPLICA_DIR/postgresql.conf" "$REPLICA_DIR/pg_hba.conf"
    log "made a replica of 127.0.0.1:$PRIMARY_PORT in $REPLICA_DIR (apply delay $DELAY)"
fi
as_postgres "$bin/pg_ctl" -D "$REPLICA_DIR" -l "$REPLICA_DIR/replica.log" -w start >/dev/null ||
    die "the replica did not start; see $REPLICA_DIR/replica.log"
for _ in $(seq 1 30); do
    replica_answers && break
    sleep 1
done
replica_answers || die "the replica started but does not answer on 127.0.0.1:$REPLICA_PORT"
log "replica answers on 127.0.0.1:$REPLICA_PORT"
