#!/usr/bin/env bash
# Embedding benchmark: this project's embedder (tract, release build) against ONNX Runtime on
# the same model, photos and input tensors, plus decode + preprocess at 1/12/24 MP. Prints one
# set of markdown tables (see BENCHMARKS.md).
# Usage: scripts/bench_embed.sh [bench_embed.py options, e.g. --rounds 3 --passes 3 --two-core]
# Env: BENCH_VENV (default /tmp/bench-embed-venv), BENCH_WORK (default /tmp/bench-embed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-/tmp/bench-embed-venv}"
WORK="${BENCH_WORK:-/tmp/bench-embed}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
# The versions the published figures were taken with.
PY_PKGS=(onnxruntime==1.32.0 onnx==1.23.2 numpy==2.4.6 pillow==13.0.0)

log() { echo "bench_embed.sh: $*" >&2; }

cd "$ROOT"
"$ROOT/scripts/fetch-model.sh"

log "building the example (release)"
cargo build --release -p media-clustering-actors --example bench_embed

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import onnxruntime, onnx, numpy, PIL' >/dev/null 2>&1; then
    log "installing ${PY_PKGS[*]} into $VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q "${PY_PKGS[@]}"
fi

exec "$VENV/bin/python" "$ROOT/scripts/bench_embed.py" \
    --rust-bin "$TARGET/release/examples/bench_embed" \
    --model "$ROOT/models/open-nsfw.onnx" \
    --photos "$ROOT/tests/fixtures/photos" \
    --work "$WORK" "$@"
