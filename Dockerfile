# provring server image: docker build -t provring .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin provring

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/provring /usr/local/bin/provring
COPY config/ /etc/provring/
WORKDIR /var/lib/provring
ENTRYPOINT ["provring"]
