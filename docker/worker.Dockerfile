# The sluice worker: multi-stage, on a slim Debian base with only the runtime libraries the
# binary loads, run as a non-root user.
# Build: docker build -f docker/worker.Dockerfile -t ghcr.io/sluice-dev/sluice-worker:0.1.0 .
# Without Docker, scripts/images.sh builds an equivalent image from this machine's Debian
# packages (the binary, exactly the libraries ldd lists, the CA bundle, user 65532).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      cmake pkg-config libssl-dev libsasl2-dev zlib1g-dev libzstd-dev libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice-worker --bin sluice-worker

FROM debian:bookworm-slim
# librdkafka links OpenSSL, Cyrus SASL, zstd and zlib dynamically (the distroless cc base
# lacks SASL and zstd).
RUN apt-get update && apt-get install -y --no-install-recommends \
      libssl3 libsasl2-2 libzstd1 zlib1g libcurl4 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /src/target/release/sluice-worker /usr/local/bin/sluice-worker
USER 65532:65532
EXPOSE 9095
ENTRYPOINT ["/usr/local/bin/sluice-worker"]
