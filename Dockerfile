# provring server image: docker build -t provring .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin provring

FROM debian:bookworm-slim
# curl: the health checks ask /health/ready.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/provring --create-home --uid 10001 provring \
 && mkdir -p /var/lib/provring/keys \
 && chown -R provring:provring /var/lib/provring
COPY --from=build /src/target/release/provring /usr/local/bin/provring
COPY config/ /etc/provring/
USER provring
WORKDIR /var/lib/provring
ENTRYPOINT ["provring"]
