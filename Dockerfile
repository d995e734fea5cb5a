# Container image for media-clustering: `docker build -t media-clustering .` then `docker run media-clustering [serve|api|worker|migrate]`.

# ---- build the release binary ------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# The dependencies first, in a layer of their own: it is rebuilt only when a manifest or the
# lock file changes, not on every source change (stub targets stand in for the sources).
COPY Cargo.toml Cargo.lock ./
COPY actors/Cargo.toml actors/Cargo.toml
RUN mkdir -p src actors/src actors/benches tests/it \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs actors/src/lib.rs tests/it/main.rs \
 && echo 'fn main() {}' > actors/benches/envelope.rs \
 && cargo build --release --locked --bin media-clustering \
 && rm -rf src actors/src actors/benches tests
COPY . .
# Newer than the stubs' build, so that cargo rebuilds the two crates of this workspace.
RUN touch src/main.rs src/lib.rs actors/src/lib.rs \
 && cargo build --release --locked --bin media-clustering \
 && install -D -m 0755 target/release/media-clustering /out/media-clustering

# ---- fetch and verify the default ONNX model (same script and pinned sha256 as local dev) ----
FROM python:3.12-slim-bookworm AS model
WORKDIR /src
COPY scripts/fetch-model.sh scripts/venv.sh scripts/as_root.sh scripts/prepare_model.py scripts/open-nsfw-int8.ranges.json scripts/
# The pinned model, and the 8-bit default derived from it (scripts/prepare_model.py, its own
# sha256 pinned in the script); the derivation's tools stay in this stage.
RUN PIP_ROOT_USER_ACTION=ignore bash scripts/fetch-model.sh \
 && echo "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa  models/open-nsfw.onnx" | sha256sum -c - \
 && rm -rf models/.prepare-venv

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /app/data/media /data/media \
 && chown app:app /app/data /app/data/media /data /data/media
WORKDIR /app
COPY --from=builder /out/media-clustering /usr/local/bin/media-clustering
COPY config/ /app/config/
COPY migrations/ /app/migrations/
COPY --from=model /src/models/ /app/models/
# The image runs production settings: listening on all interfaces (config/production.toml),
# secrets from the environment (start-up fails without them, or with short or development
# ones). config/default.toml's relative models/ paths also resolve from /app. ONNX Runtime's
# library (the default embedder backend) comes from the same pinned wheel as in local dev.
ENV APP_ENV=production \
    MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH=/app/models/open-nsfw-int8.onnx \
    MEDIA_CLUSTERING__EMBEDDER__ONNXRUNTIME_LIBRARY=/app/models/libonnxruntime.so.1.32.0
USER app
EXPOSE 8080 9091
# `serve` and `api` answer on 8080, `worker` on 9091; the check tries both.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["media-clustering", "healthcheck"]
ENTRYPOINT ["media-clustering"]
CMD ["serve"]
