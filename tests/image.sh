#!/usr/bin/env bash
# Proves the container image without a registry: builds the Dockerfile's
# runtime stage with buildah on a Debian base made locally by debootstrap,
# then inside the image runs `eventplane --version`, `eventplane-operator
# --version` and `eventplane migrate` against the local Postgres, and checks
# that the image runs as a numeric non-root user.
#
# The binaries are the ones cargo built on this machine (same Debian as the
# base), copied in through the Dockerfile's `BINARIES=prebuilt` path:
# compiling inside the image on a CI machine would take many minutes. The
# base image is cached under $EVENTPLANE_IMAGE_CACHE between runs.
#
# Usage: tests/image.sh [TARGET_DIR]   (default: $CARGO_TARGET_DIR or ./target)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE=${EVENTPLANE_IMAGE_CACHE:-/var/cache/eventplane}
BASE_TAR="$CACHE/debian-bookworm-minbase.tar"
BASE_IMAGE=localhost/eventplane-base:bookworm-minbase
IMAGE=localhost/eventplane:test
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export PGOPTIONS="-c client_min_messages=warning"

log() { echo "image: $*"; }
die() { echo "image: error: $*" >&2; exit 1; }

for tool in buildah debootstrap psql; do
    command -v "$tool" >/dev/null || die "$tool not found (tests/ensure-services.sh installs it)"
done

target=${1:-${CARGO_TARGET_DIR:-target}}
profile_dir="$target/debug"
for bin in eventplane eventplane-operator; do
    [ -x "$profile_dir/$bin" ] || die "$profile_dir/$bin missing: run cargo build --bin $bin first"
done

# The base: a minimal Debian, made once and kept as a tarball.
if [ ! -s "$BASE_TAR" ]; then
    log "making the base with debootstrap (once; cached in $BASE_TAR)"
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -cf "$BASE_TAR.partial" .
    rm -rf "$rootfs"
    mv "$BASE_TAR.partial" "$BASE_TAR"
fi
base_id="$(sha256sum "$BASE_TAR" | cut -c1-12)"
if [ "$(buildah inspect --type image --format '{{index .ImageAnnotations "eventplane.base"}}' "$BASE_IMAGE" 2>/dev/null)" != "$base_id" ]; then
    log "importing the base into buildah as $BASE_IMAGE"
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    tar -C "$mnt" -xf "$BASE_TAR"
    buildah umount "$ctr" >/dev/null
    buildah config --annotation "eventplane.base=$base_id" "$ctr"
    buildah commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
    buildah rm "$ctr" >/dev/null
fi

# The build context holds only the binaries; the Dockerfile is the repo's.
context=$(mktemp -d)
ctr=""
cleanup() {
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
    rm -rf "$context"
}
trap cleanup EXIT
mkdir "$context/prebuilt"
cp "$profile_dir/eventplane" "$profile_dir/eventplane-operator" "$context/prebuilt/"

log "building $IMAGE from Dockerfile (BINARIES=prebuilt, RUNTIME_IMAGE=$BASE_IMAGE)"
buildah bud --quiet --isolation chroot --pull=never \
    --build-arg BINARIES=prebuilt \
    --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
    -f Dockerfile -t "$IMAGE" "$context" >/dev/null

user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || die "image user is '$user', want a numeric non-root uid"
log "image user: $user"

ctr=$(buildah from --pull=never "$IMAGE")
run() { buildah run --isolation chroot --network host "$ctr" -- "$@"; }

[ "$(run id -u)" != 0 ] || die "the image runs as root"

version=$(run /usr/local/bin/eventplane --version)
log "$version"
[[ "$version" =~ ^eventplane\ [0-9]+\.[0-9]+\.[0-9]+\ \(([0-9a-f]{7,40}|unknown)\)$ ]] ||
    die "unexpected version line: $version"
want_rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[[ "$version" == *"($want_rev)" ]] || die "version line names another revision than $want_rev: $version"
operator_version=$(run /usr/local/bin/eventplane-operator --version)
log "$operator_version"
[[ "$operator_version" == "eventplane-operator ${version#eventplane }" ]] ||
    die "the operator reports another version: $operator_version"

# `migrate` inside the image, against a fresh database on the local Postgres.
db="eventplane_image_$$"
admin_url="${DATABASE_URL%/*}/postgres"
psql "$admin_url" -qAtc "DROP DATABASE IF EXISTS $db" >/dev/null
psql "$admin_url" -qAtc "CREATE DATABASE $db" >/dev/null
drop_db() { psql "$admin_url" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; }
trap 'drop_db; cleanup' EXIT
run /usr/local/bin/eventplane migrate --database-url "${DATABASE_URL%/*}/$db"
tables=$(psql "${DATABASE_URL%/*}/$db" -qAtc "SELECT count(*) FROM pg_tables WHERE tablename IN ('events', 'projection_catalog')")
[ "$tables" = 2 ] || die "migrate in the image did not create the schema (found $tables of 2 tables)"
log "migrate in the image created the schema"
log "ok"
