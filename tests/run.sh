#!/usr/bin/env bash
# The project's test command: services, formatting, lints, then every test
# against the real Postgres and Redis.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash tests/ensure-services.sh
# The read-replica tests read from a real streaming replica on port 5433.
bash tests/ensure-replica.sh
# The cluster tests use a 3-master Redis Cluster on ports 7000-7002.
bash tests/ensure-redis-cluster.sh
# The relay tests publish to a real Kafka-protocol broker (tansu) on 9092.
bash tests/ensure-kafka.sh
if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

# Tests create their own databases from this URL.
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export EVENTPLANE_REPLICA_URL="${EVENTPLANE_REPLICA_URL:-postgres://postgres@127.0.0.1:5433/postgres}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"

step() { echo; echo "==> $*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "Helm chart (tests/chart.sh)"
bash tests/chart.sh

step "Argo CD health check (tests/argocd)"
lua5.4 tests/argocd/health_test.lua charts/eventplane/argocd/health.lua

step "Kubernetes API emulator (tests/k8s)"
# The emulator that the operator's end-to-end test runs against checks its
# own API semantics first.
python3 -m unittest discover -s tests/k8s

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
    # nextest does not run doctests; run them only where some exist.
    if grep -rlq --include='*.rs' -E '^\s*//[/!].*```' operator services tests 2>/dev/null; then
        step "doctests"
        cargo test --workspace --doc
    fi
else
    # cargo test runs doctests too.
    cargo test --workspace --no-fail-fast
fi

# CRD staleness check: the generated YAML under crds/ must match the Rust types.
if [ -f operator/Cargo.toml ]; then
    step "crds are up to date"
    cargo run -q -p eventplane-operator --bin crdgen
    git diff --exit-code crds/ charts/eventplane/crds/
fi

step "container image (tests/image.sh)"
# The image test copies the binaries cargo built here into the Dockerfile's
# runtime stage; build them (already built by the tests, so this is quick).
cargo build -q --bin eventplane --bin eventplane-operator
bash tests/image.sh

if [ -z "${KUBECONFIG:-}" ]; then
    echo
    echo "note: the end-to-end cluster suite (tests/tests/cluster.rs) was skipped: KUBECONFIG is not set"
fi

echo
echo "all checks passed"
