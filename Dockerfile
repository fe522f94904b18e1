# One image for every role and the operator: /usr/local/bin/eventplane and
# /usr/local/bin/eventplane-operator on a small runtime base, run as the
# numeric non-root user 65532, with nothing written to the root filesystem
# (it can be mounted read-only).
#
#   buildah bud -t eventplane:0.1.0 --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD) .
#   docker build -t eventplane:0.1.0 --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD) .
#
# Build arguments:
#   BUILDER_IMAGE  the Rust toolchain stage (Debian 12, like the runtime)
#   RUNTIME_IMAGE  the runtime base: glibc, libgcc and CA certificates
#   BINARIES       `source` (default) compiles in the builder stage;
#                  `prebuilt` takes `eventplane` and `eventplane-operator`
#                  from the build context's prebuilt/ directory (the test
#                  script tests/image.sh uses it with binaries cargo built
#                  on a Debian 12 host)
#   GIT_REVISION   the revision `--version` prints (no .git in the context)
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARIES=source

FROM ${BUILDER_IMAGE} AS source
ARG GIT_REVISION=unknown
ENV EVENTPLANE_GIT_REVISION=${GIT_REVISION} \
    CARGO_TARGET_DIR=/build/target
WORKDIR /build/src
# rdkafka builds its bundled librdkafka with cmake (zlib is linked in
# statically: the runtime base has no libz).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake make g++ libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin eventplane --bin eventplane-operator \
 && mkdir -p /out \
 && cp /build/target/release/eventplane /build/target/release/eventplane-operator /out/

FROM scratch AS prebuilt
COPY prebuilt/eventplane prebuilt/eventplane-operator /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
COPY --from=binaries /out/eventplane /out/eventplane-operator /usr/local/bin/
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/eventplane"]
