# The sluice controller: multi-stage, minimal non-root base.
# Build: docker build -f docker/controller.Dockerfile -t ghcr.io/sluice-dev/sluice-controller:0.1.0 .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      cmake pkg-config libssl-dev libsasl2-dev zlib1g-dev libzstd-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice-controller --bin sluice-controller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sluice-controller /usr/local/bin/sluice-controller
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sluice-controller"]
