# bulwark's image: built with the Rust toolchain, run from a small image as a non-root user.
#   docker build -t registry.example.com/bulwark:0.1.0 .
# Pin the tag you deploy (k8s/deployment.yaml), never :latest.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a change to bulwark's own code does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin bulwark \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin bulwark

# glibc and libgcc only (bulwark links no OpenSSL: TLS is rustls with the public roots
# compiled in), no shell, user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bulwark /usr/local/bin/bulwark
COPY config/shop.toml /etc/bulwark/bulwark.toml
USER 65532:65532
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/bulwark"]
CMD ["serve", "--config", "/etc/bulwark/bulwark.toml"]
