# linkgate container image.
#
#   docker build -t linkgate .
#   docker run -p 443:443 -p 80:80 -v /srv/linkgate:/etc/linkgate:ro linkgate
#
# The runtime image is distroless (no shell, no package manager) and runs as
# the unprivileged user 65532. The binary carries CAP_NET_BIND_SERVICE as a
# file capability so it can bind 443 and 80 without root.

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libcap2-bin && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked \
 && install -m 0755 target/release/linkgate /linkgate \
 && setcap cap_net_bind_service=+ep /linkgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /linkgate /usr/local/bin/linkgate
ENV LINKGATE_CONFIG=/etc/linkgate/linkgate.toml
USER 65532:65532
EXPOSE 443 80
ENTRYPOINT ["/usr/local/bin/linkgate", "serve"]
