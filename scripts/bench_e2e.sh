#!/usr/bin/env bash
# End-to-end load benchmark: builds the release binary, prepares a virtualenv (psycopg,
# matplotlib, and the reference loop's Pillow, onnxruntime, scikit-learn), and runs
# scripts/bench_e2e.py against local Redis and Postgres.
# Usage: scripts/bench_e2e.sh [bench_e2e.py options]
#   scripts/bench_e2e.sh                                   # closed loop with the default config
#   scripts/bench_e2e.sh --embedders 1,2,4 --rates 10,20,40 --plot docs/bench-e2e.png
# Env: BENCH_E2E_VENV (default /tmp/bench-e2e-venv), BIN (skip the build, use this binary).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_E2E_VENV:-/tmp/bench-e2e-venv}"
cd "$ROOT"
log() { echo "bench_e2e.sh: $*" >&2; }

scripts/ensure-services.sh
scripts/fetch-model.sh
if [ -z "${BIN:-}" ]; then
    log "building the release binary"
    cargo build --release --bin media-clustering
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/media-clustering"
fi
# psycopg reads the jobs table, matplotlib draws the plot; the rest is the reference loop's
# (scripts/reference_loop.py: Pillow, ONNX Runtime, scikit-learn).
if ! "$VENV/bin/python" -c 'import psycopg, matplotlib, PIL, onnx, onnxruntime, sklearn' >/dev/null 2>&1; then
    log "preparing $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q 'psycopg[binary]==3.2.*' 'matplotlib==3.10.*' \
        'pillow==11.*' 'onnxruntime==1.32.0' 'onnx==1.*' 'scikit-learn==1.*' 'numpy==2.*'
fi
exec "$VENV/bin/python" scripts/bench_e2e.py --bin "$BIN" "$@"
