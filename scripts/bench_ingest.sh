#!/usr/bin/env bash
# API ingest benchmark: wrk posts one small photo (multipart, a valid token) to the upload
# route of `media-clustering api` (local Redis and Postgres, rate limit off), and, in the same
# run, to `media-clustering bench bare-api`, a bare actix-web handler that reads the body and
# answers 202. Prints the rates and their ratio. In the first upload run every request after
# the first repeats a photo the pet has, so it measures the API's whole path (multipart, the
# decode check, the hash, the Postgres lookup and job insert, the XADD) without the storage
# write; the second posts a new photo each request, so each also stores an object and a row.
# Usage: scripts/bench_ingest.sh [-d SECONDS] [-c CONNECTIONS] [-t THREADS]
# Env: BIN (skip the build, use this binary), PHOTO (default tests/fixtures/photos/chelsea__small.jpg).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { echo "bench_ingest.sh: $*" >&2; }
DURATION=10 CONNS=16 THREADS=2
while getopts "d:c:t:" o; do
    case "$o" in
        d) DURATION="$OPTARG" ;; c) CONNS="$OPTARG" ;; t) THREADS="$OPTARG" ;;
        *) exit 2 ;;
    esac
done
PHOTO="${PHOTO:-$ROOT/tests/fixtures/photos/chelsea__small.jpg}"

command -v wrk >/dev/null 2>&1 || {
    log "installing wrk (Debian package)"
    { apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }; } >/dev/null
}
scripts/ensure-services.sh >/dev/null
scripts/fetch-model.sh >/dev/null
if [ -z "${BIN:-}" ]; then
    log "building the release binary"
    cargo build --release --bin media-clustering
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/media-clustering"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WORK="$(mktemp -d)"
TAG="$(python3 -c 'import uuid; print(uuid.uuid4().hex[:10])')"
DB="bench_ingest_$TAG"
API_PORT="$(free_port)" BARE_PORT="$(free_port)"
export APP_ENV=development LOG_LEVEL=warn TELEMETRY_ENABLED=false \
    DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/$DB" REDIS_URL="redis://127.0.0.1:6379/0" \
    AUTH_JWT_SECRET="bench-jwt-secret-0123456789abcdef0123456789" \
    INTERNAL_METRICS_TOKEN="bench-internal-token-0123456789abcdef" \
    MEDIA_CLUSTERING__SERVER__BIND="127.0.0.1:$API_PORT" \
    MEDIA_CLUSTERING__REDIS__STREAM="bench-ingest:$TAG:jobs" \
    MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM="bench-ingest:$TAG:dl" \
    MEDIA_CLUSTERING__STORAGE__URL="file://$WORK/media" \
    MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND=0
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    redis-cli DEL "bench-ingest:$TAG:jobs" "bench-ingest:$TAG:dl" >/dev/null 2>&1 || true
    psql "postgres://postgres:postgres@127.0.0.1:5432/postgres" -X -q -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

scripts/create-db.sh "$DATABASE_URL" >/dev/null
"$BIN" migrate >/dev/null
"$BIN" api >"$WORK/api.log" 2>&1 & pids+=($!)
"$BIN" bench bare-api --bind "127.0.0.1:$BARE_PORT" >"$WORK/bare.log" 2>&1 & pids+=($!)
for url in "http://127.0.0.1:$API_PORT/healthz" "http://127.0.0.1:$BARE_PORT/healthz"; do
    for _ in $(seq 1 200); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.1; done
    curl -fsS -o /dev/null "$url" || { cat "$WORK"/*.log >&2; exit 1; }
done
TOKEN="$("$BIN" token --sub bench-ingest --ttl 3600)"

# The request wrk repeats: one part named `files`, the photo, a bearer token.
BOUNDARY="bench-ingest-boundary-$TAG"
python3 - "$PHOTO" "$BOUNDARY" "$WORK/body" <<'PY'
import sys
photo, boundary, out = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(photo, "rb").read()
ctype = "image/png" if photo.endswith(".png") else "image/jpeg"
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"photo\"\r\n"
        f"Content-Type: {ctype}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
open(out, "wb").write(body)
PY
cat >"$WORK/post.lua" <<LUA
local f = assert(io.open("$WORK/body", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=$BOUNDARY"
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
# The same request with a new photo each time: the JPEG with a counter after its end marker
# (decoders stop there; the hash, so the image, is new), so every upload stores an object and
# inserts an image row too.
cat >"$WORK/post-new.lua" <<LUA
local f = assert(io.open("$WORK/body", "rb"))
local body = f:read("*a")
f:close()
local cut = body:find("\r\n--$BOUNDARY--", 1, true)
local head, tail = body:sub(1, cut - 1), body:sub(cut)
local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end
local n = 0
function request()
    n = n + 1
    local headers = {}
    headers["Content-Type"] = "multipart/form-data; boundary=$BOUNDARY"
    headers["Authorization"] = "Bearer $TOKEN"
    return wrk.format("POST", nil, headers, head .. "bench-ingest " .. tid .. " " .. n .. tail)
end
LUA
status="$(curl -s -o "$WORK/first.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $TOKEN" \
    -F "files=@$PHOTO" "http://127.0.0.1:$API_PORT/v1/pets/bench-ingest/images")"
[ "$status" = 202 ] || { log "the first upload answered $status: $(cat "$WORK/first.json")"; exit 1; }

run() { # name url [script]
    wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s "${3:-$WORK/post.lua}" "$2" >"$WORK/$1.txt"
    local rps non2xx p50 p99
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$WORK/$1.txt")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$WORK/$1.txt")"
    p50="$(awk '$1 == "50%" {print $2}' "$WORK/$1.txt")"
    p99="$(awk '$1 == "99%" {print $2}' "$WORK/$1.txt")"
    [ -z "$non2xx" ] || { log "$1: $non2xx answers were not 2xx"; cat "$WORK/$1.txt" >&2; exit 1; }
    echo "$rps $p50 $p99"
}
log "wrk -t$THREADS -c$CONNS -d${DURATION}s: bare actix-web handler"
read -r bare_rps bare_p50 bare_p99 < <(run bare "http://127.0.0.1:$BARE_PORT/v1/pets/bench-ingest/images")
log "wrk -t$THREADS -c$CONNS -d${DURATION}s: POST /v1/pets/{pet_id}/images"
read -r api_rps api_p50 api_p99 < <(run api "http://127.0.0.1:$API_PORT/v1/pets/bench-ingest/images")
log "wrk -t$THREADS -c$CONNS -d${DURATION}s: POST /v1/pets/{pet_id}/images, a new photo each request"
read -r new_rps new_p50 new_p99 < <(run api-new "http://127.0.0.1:$API_PORT/v1/pets/bench-ingest-new/images" "$WORK/post-new.lua")
jobs="$(psql "$DATABASE_URL" -X -q -t -A -c 'SELECT count(*) FROM jobs')"
images="$(psql "$DATABASE_URL" -X -q -t -A -c "SELECT count(*) FROM images WHERE pet_id = 'bench-ingest-new'")"
unrecorded="$(psql "$DATABASE_URL" -X -q -t -A -c 'SELECT count(*) FROM jobs WHERE stream_id IS NULL')"
entries="$(redis-cli XLEN "bench-ingest:$TAG:jobs")"
ratio="$(python3 -c "print(round($api_rps / $bare_rps, 3))")"
new_ratio="$(python3 -c "print(round($new_rps / $bare_rps, 3))")"
cat <<OUT
# API ingest ($(date -u '+%Y-%m-%d %H:%M'), $(nproc) cores, wrk -t$THREADS -c$CONNS -d${DURATION}s, $(basename "$PHOTO") $(stat -c %s "$PHOTO") bytes)

| target | requests/s | p50 | p99 |
|---|---|---|---|
| bare actix-web handler (202) | $bare_rps | $bare_p50 | $bare_p99 |
| \`POST /v1/pets/{pet_id}/images\` (\`api\`), a photo the pet has | $api_rps | $api_p50 | $api_p99 |
| the same, a new photo each request | $new_rps | $new_p50 | $new_p99 |

The upload route answers at **$ratio** of the bare handler's rate with a photo the pet has
($new_ratio with a new photo each request, $images of them stored); $jobs jobs were committed
and $entries enqueued ($unrecorded jobs without their stream id once it ended).
OUT
