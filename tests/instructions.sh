#!/usr/bin/env bash
# Instructions the eventplane process executes per row read, counted by
# callgrind: an L1 hit, and a miss answered by Postgres (L1 and L2 empty,
# so it also pays the L2 lookup and fill). Unlike time, the count does not
# drift with the machine's other tenants, so two builds compare at a glance
# where the bench's throughput ratios move by ten points and more between
# runs of one build.
#
# Usage: tests/instructions.sh [HITS] [MISSES]   (default 10000 and 1000)
# Env:   EVENTPLANE_BIN   the binary to measure (default: release build of
#                         this checkout, built if missing)
#        NO_REDIS=1       measure with Redis unreachable: no L1, no L2, every
#                         read straight from Postgres (the cache layers' own
#                         share of a miss is the difference)
#
# It needs valgrind (installed as root on Debian if missing), curl and the
# local Postgres and Redis (tests/ensure-services.sh starts them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

hits=${1:-10000}
misses=${2:-1000}
db=eventplane_instructions
pg="psql -h 127.0.0.1 -U postgres -Atq"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bash tests/ensure-services.sh >/dev/null
if ! command -v valgrind >/dev/null; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "instructions: valgrind is missing" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
bin=${EVENTPLANE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -p eventplane --bin eventplane
    target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    bin="$target_dir/release/eventplane"
fi

# The sample projection with an L1 TTL longer than the run: under callgrind
# a run takes minutes, and the default 2 s would turn hits into L2 reads.
manifest="$work/orders.yaml"
cp services/api/examples/orders.yaml "$manifest"
printf '  cache:\n    enabled: true\n    l1TtlMs: 3600000\n    l2TtlSeconds: 3600\n' >>"$manifest"

# A fresh database with 2,000 orders, placed by the dev stack's demo.
$pg -d postgres -c "drop database if exists $db" -c "create database $db"
url="postgres://postgres@127.0.0.1:5432/$db"
port=18480
admin=18490
if ! REDIS_URL=redis://127.0.0.1:6379 "$bin" dev --database-url "$url" --projections "$manifest" \
    --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin --exit-after-demo >"$work/seed.log" 2>&1; then
    echo "instructions: placing the orders failed:" >&2
    sed '/^Stack backtrace:/q' "$work/seed.log" | tail -n 20 >&2
    exit 1
fi
scope=$($pg -d $db -c "select id from eventplane_instance")

# curl config files: one keep-alive connection reads each listed row in turn.
reads() { sed "s|.*|url = \"http://127.0.0.1:$port/v1/projections/orders/rows/&\"\noutput = \"/dev/null\"|" "$1"; }
$pg -d $db -c "select id from orders_v1 order by id limit 20" >"$work/hot"
$pg -d $db -c "select id from orders_v1 order by id offset 20 limit 50" >"$work/warm"
$pg -d $db -c "select id from orders_v1 order by id offset 70 limit $misses" >"$work/cold"
[ "$(wc -l <"$work/cold")" = "$misses" ] || { echo "instructions: the demo placed fewer than $((misses + 70)) orders" >&2; exit 1; }
awk -v n="$hits" '{ key[NR] = $0 } END { for (i = 0; i < n; i++) print key[i % NR + 1] }' "$work/hot" >"$work/hits"
reads "$work/hot" >"$work/hot.curl"
reads "$work/warm" >"$work/warm.curl"
reads "$work/hits" >"$work/hits.curl"
reads "$work/cold" >"$work/cold.curl"

# Answers by status and cache layer, e.g. "10000 200 l1".
read_all() {
    curl -s -w '%{http_code} %header{eventplane-cache}\n' --config "$1" | sort | uniq -c | sed 's/^ *//'
}

# Starts the binary under callgrind with instrumentation off, runs `warm`,
# counts the instructions of `measured`, and prints the count.
count() {
    local warm=$1 measured=$2 out="$work/callgrind.$3"
    local redis=redis://127.0.0.1:6379
    [ -n "${NO_REDIS:-}" ] && redis=redis://127.0.0.1:1
    REDIS_URL=$redis valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$bin" dev --database-url "$url" --projections "$manifest" --demo-orders 0 \
        --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin >"$work/$3.log" 2>&1 &
    local pid=$!
    local waited=0
    until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null; do
        if ! kill -0 $pid 2>/dev/null || [ $waited = 300 ]; then
            echo "instructions: eventplane stopped, or was not ready after ${waited}s:" >&2
            sed '/^Stack backtrace:/q' "$work/$3.log" | tail -n 20 >&2
            kill $pid 2>/dev/null || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    # The invalidation subscription goes live just after readiness; until
    # then reads bypass L1.
    sleep 5
    read_all "$warm" >"$work/$3.warm"
    callgrind_control -i on $pid >/dev/null
    read_all "$measured" >"$work/$3.answers"
    # L2 fills are written after the answer, in batches.
    sleep 1
    callgrind_control -i off $pid >/dev/null
    callgrind_control -d $pid >/dev/null
    kill $pid
    wait $pid 2>/dev/null || true
    local dump
    dump=$(ls -S "$out"* | head -n1)
    callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }'
}

hit_total=$(count "$work/hot.curl" "$work/hits.curl" hits)
# Nothing read before may answer from L2: its row keys go first.
redis-cli --scan --pattern "ep:{$scope:orders}:*" | xargs -r -n 500 redis-cli del >/dev/null
miss_total=$(count "$work/warm.curl" "$work/cold.curl" misses)

echo "eventplane: $bin${NO_REDIS:+ (Redis unreachable)}"
echo "hits:   $(tr '\n' ' ' <"$work/hits.answers")-> $((hit_total / hits)) instructions each ($hit_total for $hits)"
echo "misses: $(tr '\n' ' ' <"$work/misses.answers")-> $((miss_total / misses)) instructions each ($miss_total for $misses)"
$pg -d postgres -c "drop database $db"
