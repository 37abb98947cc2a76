# syntax=docker/dockerfile:1
# The zeroscale image: one static-ish binary on a distroless base, run as a non-root user.
#   make docker-build     (docker build -t zeroscale:dev .)
# Both the operator and the activator run it: `zeroscale operator`, `zeroscale activator`.

ARG RUST_VERSION=1.89

# --- build -------------------------------------------------------------------------
# Debian 12 (bookworm), the same glibc as the runtime image below.
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# --locked: build exactly Cargo.lock, never a freshly resolved dependency.
# debuginfo stripped, symbols kept: a small binary whose panics still name functions.
# The cache mounts keep the registry and the target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked --bin zeroscale \
    && cp target/release/zeroscale /zeroscale

# --- runtime -----------------------------------------------------------------------
# distroless/cc: glibc and libgcc only, no shell, no package manager. TLS is rustls, so
# no OpenSSL is needed. The :nonroot variant's default user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="zeroscale" \
      org.opencontainers.image.description="Kubernetes operator that scales HTTP workloads to zero" \
      org.opencontainers.image.source="https://github.com/zeroscale/zeroscale" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /zeroscale /zeroscale
# Numeric, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/zeroscale"]
