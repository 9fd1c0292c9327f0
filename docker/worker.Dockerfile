# The sluice worker: multi-stage, static-ish binary on a minimal non-root base.
# Build: docker build -f docker/worker.Dockerfile -t ghcr.io/sluice-dev/sluice-worker:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      cmake pkg-config libssl-dev libsasl2-dev zlib1g-dev libzstd-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice-worker --bin sluice-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sluice-worker /usr/local/bin/sluice-worker
USER 65532:65532
EXPOSE 9095
ENTRYPOINT ["/usr/local/bin/sluice-worker"]
