#!/usr/bin/env bash
# End-to-end demo: start services, build, migrate, run `serve` in the background and upload a photo folder. Usage: scripts/demo.sh [FOLDER] [extra upload args...]  (env: DEMO_PORT=8080, DEMO_PET=demo-pet)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PORT="${DEMO_PORT:-8080}"
PET="${DEMO_PET:-demo-pet}"
HEALTH_TIMEOUT="${DEMO_HEALTH_TIMEOUT:-120}"
DEMO_DIR="$ROOT/.demo"
LOG="$DEMO_DIR/serve.log"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/media-clustering"
BASE_URL="http://127.0.0.1:$PORT"

step() { printf '\n==> %s\n' "$*"; }
die() { echo "demo: ERROR: $*" >&2; exit 1; }

# First non-option argument is the folder to upload; everything else goes to `upload`.
FOLDER="tests/fixtures/photos"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    FOLDER="$1"
    shift
fi
[ -d "$FOLDER" ] || die "folder not found: $FOLDER"

step "Ensuring Redis and PostgreSQL are running"
"$ROOT/scripts/ensure-services.sh"
if ! command -v curl >/dev/null 2>&1; then
    echo "demo: installing curl"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    { $sudo_cmd apt-get update -qq && $sudo_cmd env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends curl ca-certificates; } >/dev/null 2>&1 \
        || die "curl is required; install it and retry"
fi

step "Fetching the ONNX model"
"$ROOT/scripts/fetch-model.sh"

step "Building media-clustering (debug profile)"
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust via https://rustup.rs"
cargo build --bin media-clustering
[ -x "$BIN" ] || die "binary not found at $BIN"

export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/media_clustering_demo"
export REDIS_URL="redis://127.0.0.1:6379/0"
export MEDIA_CLUSTERING__REDIS__STREAM="media:cluster:jobs:demo"
export MEDIA_CLUSTERING__STORAGE__URL="file://$DEMO_DIR/media"
export MEDIA_CLUSTERING__SERVER__BIND="127.0.0.1:$PORT"
export TELEMETRY_ENABLED=false
export LOG_LEVEL=info

mkdir -p "$DEMO_DIR/media"

step "Preparing database media_clustering_demo"
"$ROOT/scripts/create-db.sh" "$DATABASE_URL"
"$BIN" migrate

if curl -fsS -o /dev/null --max-time 2 "$BASE_URL/healthz" 2>/dev/null; then
    die "something is already answering on $BASE_URL; stop it or set DEMO_PORT"
fi

step "Starting server on $BASE_URL (log: $LOG)"
SERVE_PID=""
cleanup() {
    local rc=$?
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
        echo "demo: stopping server (pid $SERVE_PID)"
        kill -TERM "$SERVE_PID" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$SERVE_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    echo "demo: server log is at $LOG"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$BIN" serve >"$LOG" 2>&1 &
SERVE_PID=$!

deadline=$((SECONDS + HEALTH_TIMEOUT))
until curl -fsS -o /dev/null --max-time 2 "$BASE_URL/healthz" 2>/dev/null; do
    if ! kill -0 "$SERVE_PID" 2>/dev/null; then
        echo "demo: server exited before becoming healthy; last log lines:" >&2
        tail -n 40 "$LOG" >&2 || true
        SERVE_PID=""
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "demo: server not healthy after ${HEALTH_TIMEOUT}s; last log lines:" >&2
        tail -n 40 "$LOG" >&2 || true
        exit 1
    fi
    sleep 1
done
echo "demo: server is healthy"

step "Uploading $FOLDER as pet '$PET'"
"$BIN" upload --server "$BASE_URL" --pet "$PET" "$@" "$FOLDER"
