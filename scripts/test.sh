#!/usr/bin/env bash
# Full check used by `make test` and CI: services, model, rustfmt, clippy, then all tests (nextest if installed). Usage: scripts/test.sh [extra test-runner args...]  (env: SKIP_LINT=1 skips fmt/clippy)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

START=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
die() { echo "test: ERROR: $*" >&2; exit 1; }
finish() {
    local rc=$? elapsed=$((SECONDS - START))
    printf '\n==> %s in %dm%02ds\n' "$([ "$rc" -eq 0 ] && echo "passed" || echo "FAILED (exit $rc)")" \
        $((elapsed / 60)) $((elapsed % 60))
}
trap finish EXIT

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust via https://rustup.rs"

# Install a missing rustup component (rustfmt/clippy) when rustup is available.
ensure_component() {
    local sub="$1" component="$2"
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "cargo $sub is missing and rustup is not available"
        echo "test: installing rustup component $component"
        rustup component add "$component"
    fi
}

step "Ensuring Redis and PostgreSQL are running"
scripts/ensure-services.sh

step "Fetching the ONNX model (and deriving the embedder's 8-bit model from it)"
scripts/fetch-model.sh

if [ "${SKIP_LINT:-0}" = "1" ]; then
    step "Skipping rustfmt and clippy (SKIP_LINT=1)"
else
    step "cargo fmt --all -- --check"
    ensure_component fmt rustfmt
    cargo fmt --all -- --check

    # --workspace: the root is also a package, so without it the actors crate is skipped.
    step "cargo clippy --workspace --all-targets -- -D warnings"
    ensure_component clippy clippy
    cargo clippy --workspace --all-targets -- -D warnings
fi

export TEST_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
export TEST_REDIS_URL="redis://127.0.0.1:6379"
export MODEL_PATH="$ROOT/models/open-nsfw-int8.onnx"

# promtool checks the metrics text in the tests (Debian's prometheus package).
if ! command -v promtool >/dev/null 2>&1; then
    step "Installing promtool (Debian package prometheus)"
    { apt-get install -y -qq prometheus || { apt-get update -qq && apt-get install -y -qq prometheus; }; } >/dev/null
fi

# cjpeg makes JPEGs of every chroma sampling layout for the hostile-upload tests
# (Debian's libjpeg-turbo-progs).
if ! command -v cjpeg >/dev/null 2>&1; then
    step "Installing cjpeg (Debian package libjpeg-turbo-progs)"
    { apt-get install -y -qq libjpeg-turbo-progs || { apt-get update -qq && apt-get install -y -qq libjpeg-turbo-progs; }; } >/dev/null
fi

# A real OTLP/HTTP receiver for the trace tests, in a virtualenv under target/.
step "Installing the OTLP test receiver (oteltap)"
PYTOOLS="$ROOT/target/pytools"
if ! "$PYTOOLS/bin/oteltap" --help >/dev/null 2>&1; then
    scripts/venv.sh "$PYTOOLS"
    "$PYTOOLS/bin/pip" install -q oteltap
fi
# An OTLP/gRPC receiver for the gRPC export test (tests/it/grpc_receiver.py).
"$PYTOOLS/bin/python" -c "import grpc, opentelemetry.proto" 2>/dev/null \
    || "$PYTOOLS/bin/pip" install -q grpcio opentelemetry-proto
export OTELTAP="$PYTOOLS/bin/oteltap"
# ONNX Runtime's library (fetched with the model above), for the tests that load it directly.
ORT_DYLIB_PATH="$ROOT/models/libonnxruntime.so.1.32.0"
[ -f "$ORT_DYLIB_PATH" ] || die "$ORT_DYLIB_PATH is missing (scripts/fetch-model.sh fetches it)"
export ORT_DYLIB_PATH

# Each test runs in its own process under nextest, so the process-wide metrics a test
# reads are its own; install it when missing (a one-off build of a few minutes).
if ! cargo nextest --version >/dev/null 2>&1; then
    step "Installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

# Databases left by interrupted earlier runs (tests drop their own when they pass).
psql "$TEST_DATABASE_URL" -X -q -t -A -c "SELECT datname FROM pg_database WHERE datname LIKE 'mc_test_%'" 2>/dev/null \
    | while read -r db; do
        [ -n "$db" ] && psql "$TEST_DATABASE_URL" -X -q -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
    done

step "cargo nextest run --workspace --no-fail-fast $*"
cargo nextest run --workspace --no-fail-fast "$@"

# The dashboard's every PromQL expression against a real Prometheus scraping a real job.
step "Dashboard queries against a real Prometheus"
BIN="$ROOT/target/debug/media-clustering" scripts/check-dashboard.sh

# deploy/k8s: schemas, CRD schemas, checkov, and no setting the service does not read.
step "Kubernetes manifests and the Dockerfile"
scripts/check-k8s.sh "$ROOT/target/debug/media-clustering"

# The API against its own OpenAPI document, fuzzed by schemathesis.
step "Schemathesis against /openapi.json"
scripts/schemathesis.sh

# The end-to-end benchmark, tiny, on the debug binary: its report must have every figure.
step "Smoke test of the end-to-end benchmark"
"$PYTOOLS/bin/python" -c "import psycopg" 2>/dev/null || "$PYTOOLS/bin/pip" install -q 'psycopg[binary]==3.2.*'
scripts/smoke_bench_e2e.sh "$PYTOOLS/bin/python" "$ROOT/target/debug/media-clustering"
