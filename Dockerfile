# linkgate container image: one static binary on an empty (scratch) base,
# running as an unprivileged user, for linux/amd64 and linux/arm64
# (Graviton, Ampere) from this one file.
#
#   podman build -t linkgate .                                   # compiles in the build stage
#   podman build --platform linux/arm64 -t linkgate:arm64 .      # cross-compiles on any build host
#   podman build --build-arg BINARY=prebuilt --platform linux/ARCH -t linkgate .
#       # takes dist/ARCH/linkgate (ARCH: amd64 or arm64), built outside:
#       RUSTFLAGS="-C target-feature=+crt-static" \
#         cargo build --release --locked --target x86_64-unknown-linux-gnu    # or aarch64-unknown-linux-gnu
#       install -D target/x86_64-unknown-linux-gnu/release/linkgate dist/amd64/linkgate
#   (scripts/container-test does exactly that for both, runs and checks the
#   amd64 image, runs the arm64 binary under qemu-user, and makes a manifest list)
#
# Run with the config folder mounted at /etc/linkgate:
#   podman run -d -v /srv/linkgate:/etc/linkgate:ro \
#     --sysctl net.ipv4.ip_unprivileged_port_start=0 -p 443:443 -p 443:443/udp -p 80:80 linkgate
# (443/udp: HTTP/3, when the config sets listen.http3.)
# The user is not root: binding 443/80 needs that sysctl (Docker sets it by
# default since 20.10; Kubernetes: securityContext.sysctls), or listen on
# 8443/8080 and map the ports.

ARG BINARY=compiled

# Compiles on the build host's own platform, for the target's: no emulation.
FROM --platform=$BUILDPLATFORM docker.io/library/rust:1-bookworm AS compiled
ARG TARGETARCH
WORKDIR /src
# The cross linker and C compiler (aws-lc) for arm64; nothing for amd64.
# hadolint ignore=DL3008
RUN if [ "$TARGETARCH" = arm64 ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
      && rm -rf /var/lib/apt/lists/* && rustup target add aarch64-unknown-linux-gnu; \
    fi
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member (the benchmark's load generator): cargo reads its
# manifest, but builds linkgate alone.
COPY bench/h3load ./bench/h3load
RUN case "$TARGETARCH" in \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      amd64|"") target=x86_64-unknown-linux-gnu ;; \
      *) echo "unsupported architecture: $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" \
 && install -D -m 0755 "target/$target/release/linkgate" /out/linkgate

FROM scratch AS prebuilt
ARG TARGETARCH
COPY dist/${TARGETARCH}/linkgate /out/linkgate

# The binary from whichever stage BINARY names.
# hadolint ignore=DL3006
FROM ${BINARY} AS binary

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="linkgate" \
      org.opencontainers.image.description="TLS-terminating proxy for email link-branding (click and open tracking) domains" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md"
COPY --from=binary /out/linkgate /linkgate
ENV LINKGATE_CONFIG=/etc/linkgate/linkgate.toml
USER 65532:65532
# 443/udp: HTTP/3 (listen.http3), off unless the config sets it.
EXPOSE 443 443/udp 80 9901
# Needs [admin] listen in the config; probes /healthz over loopback.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/linkgate", "health"]
ENTRYPOINT ["/linkgate", "serve"]
