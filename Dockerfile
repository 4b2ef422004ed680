# linkgate container image: one static binary on an empty (scratch) base,
# running as an unprivileged user.
#
#   podman build -t linkgate .                              # compiles in the build stage
#   podman build --build-arg BINARY=prebuilt -t linkgate .  # takes dist/linkgate, built outside:
#       RUSTFLAGS="-C target-feature=+crt-static" \
#         cargo build --release --locked --target x86_64-unknown-linux-gnu
#       install -D target/x86_64-unknown-linux-gnu/release/linkgate dist/linkgate
#   (scripts/container-test does exactly that, then runs and checks the image)
#
# Run with the config folder mounted at /etc/linkgate:
#   podman run -d -v /srv/linkgate:/etc/linkgate:ro \
#     --sysctl net.ipv4.ip_unprivileged_port_start=0 -p 443:443 -p 80:80 linkgate
# The user is not root: binding 443/80 needs that sysctl (Docker sets it by
# default since 20.10; Kubernetes: securityContext.sysctls), or listen on
# 8443/8080 and map the ports.

ARG BINARY=compiled

FROM docker.io/library/rust:1-bookworm AS compiled
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/linkgate /out/linkgate

FROM scratch AS prebuilt
COPY dist/linkgate /out/linkgate

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
EXPOSE 443 80 9901
# Needs [admin] listen in the config; probes /healthz over loopback.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/linkgate", "health"]
ENTRYPOINT ["/linkgate", "serve"]
