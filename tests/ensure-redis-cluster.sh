#!/usr/bin/env bash
# Makes sure a 3-master Redis Cluster answers on 127.0.0.1:7000-7002 for the
# cluster tests. Reuses one that is up and healthy; otherwise starts the
# nodes (nothing kept on disk but their cluster configuration) and creates
# the cluster. It stops nothing.
set -euo pipefail

PORTS=(${EVENTPLANE_REDIS_CLUSTER_PORTS:-7000 7001 7002})
DIR=${EVENTPLANE_REDIS_CLUSTER_DIR:-/var/lib/eventplane-redis-cluster}

log() { echo "ensure-redis-cluster: $*"; }
die() { echo "ensure-redis-cluster: error: $*" >&2; exit 1; }

healthy() {
    redis-cli -h 127.0.0.1 -p "${PORTS[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

if healthy; then
    log "reused the cluster on 127.0.0.1:${PORTS[*]}"
    exit 0
fi
command -v redis-server >/dev/null || die "redis-server is not installed"
mkdir -p "$DIR"
for port in "${PORTS[@]}"; do
    if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" != PONG ]; then
        redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
            --cluster-enabled yes --cluster-config-file "$DIR/nodes-$port.conf" \
            --cluster-node-timeout 2000 --dir "$DIR" --save "" --appendonly no \
            --logfile "$DIR/redis-$port.log" >/dev/null
    fi
done
for port in "${PORTS[@]}"; do
    for _ in $(seq 1 20); do
        [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ] && break
        sleep 0.25
    done
done
# Nodes that remembered their cluster come back to it by themselves; fresh
# ones are joined into a new one.
for _ in $(seq 1 20); do
    healthy && break
    sleep 0.5
done
if ! healthy; then
    known=$(redis-cli -h 127.0.0.1 -p "${PORTS[0]}" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')
    if [ "${known:-1}" = 1 ]; then
        hosts=()
        for port in "${PORTS[@]}"; do hosts+=("127.0.0.1:$port"); done
        redis-cli --cluster create "${hosts[@]}" --cluster-yes >/dev/null
    fi
    for _ in $(seq 1 40); do
        healthy && break
        sleep 0.5
    done
fi
healthy || die "the cluster on 127.0.0.1:${PORTS[*]} is not healthy; see $DIR/*.log"
log "cluster answers on 127.0.0.1:${PORTS[*]}"
