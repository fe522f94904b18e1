#!/usr/bin/env bash
# Runs every Eventplane role in one process against local Postgres and Redis,
# places a short demo load, prints a summary and curl examples, then serves.
# Extra arguments go to `eventplane dev`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash tests/ensure-services.sh
if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi

cargo build --release -p eventplane
# The binary lands in the target directory cargo uses, wherever
# CARGO_TARGET_DIR or a cargo config puts it.
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -x "$target_dir/release/eventplane" ] || { echo "dev: no eventplane binary in $target_dir/release" >&2; exit 1; }

if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname = 'eventplane'")" != 1 ]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database eventplane'
    echo "dev: created database eventplane"
fi

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
exec "$target_dir/release/eventplane" dev --database-url postgres://postgres@127.0.0.1:5432/eventplane "$@"
