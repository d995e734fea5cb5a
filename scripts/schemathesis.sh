#!/usr/bin/env bash
# Property-based API testing: runs `media-clustering serve` against a fresh database,
# its own Redis streams and storage folder, then lets Schemathesis generate requests from
# the service's own /openapi.json and check every answer (no server errors, documented
# statuses, content types, headers and schemas, bad input rejected, auth enforced).
# Cleans up after itself (server, database, streams, folder) and exits non-zero on any
# failure, printing a summary.
#
# Usage: scripts/schemathesis.sh [extra `schemathesis run` args...]
# Env: ST_MAX_EXAMPLES (default 40 per operation), ST_SEED (default random), SKIP_BUILD=1
#      (use the built target/debug/media-clustering as is), BIN (another binary),
#      TEST_DATABASE_URL (admin URL, default postgres://postgres:postgres@127.0.0.1:5432/postgres),
#      TEST_REDIS_URL (default redis://127.0.0.1:6379/0), ST_VENV (default target/pytools-st).
# Needs Redis and PostgreSQL running (scripts/ensure-services.sh) and the model (scripts/fetch-model.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ST_VERSION="4.32.5"
VENV="${ST_VENV:-$ROOT/target/pytools-st}"
BIN="${BIN:-$ROOT/target/debug/media-clustering}"
ADMIN_URL="${TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
REDIS="${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-40}"
REPORT_DIR="$ROOT/target/schemathesis"

say() { printf 'schemathesis.sh: %s\n' "$*"; }
die() { printf 'schemathesis.sh: ERROR: %s\n' "$*" >&2; exit 1; }

command -v psql >/dev/null 2>&1 || die "psql not found (run scripts/ensure-services.sh)"
command -v redis-cli >/dev/null 2>&1 || die "redis-cli not found (run scripts/ensure-services.sh)"
command -v curl >/dev/null 2>&1 || die "curl not found"
[ -f "$ROOT/models/open-nsfw-int8.onnx" ] || die "models/open-nsfw-int8.onnx missing (run scripts/fetch-model.sh)"

# Schemathesis, pinned, in its own virtualenv under target/.
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $ST_VERSION" ]; then
    say "installing schemathesis $ST_VERSION into $VENV"
    "$ROOT/scripts/venv.sh" "$VENV"
    "$VENV/bin/pip" install -q "schemathesis==$ST_VERSION"
fi

if [ "${SKIP_BUILD:-0}" != "1" ] && [ "$BIN" = "$ROOT/target/debug/media-clustering" ]; then
    say "building the binary"
    cargo build -q --bin media-clustering
fi
[ -x "$BIN" ] || die "$BIN not found"

# Everything this run creates is named by one id, and removed on exit.
ID="st_$(date +%s)_$$"
DB="mc_${ID}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mc-schemathesis.XXXXXX")"
STREAM="test:${ID}:jobs"
DEADLETTER="test:${ID}:deadletter"
SERVER_PID=""
cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    psql "$ADMIN_URL" -X -q -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
    redis-cli -u "$REDIS" DEL "$STREAM" "$DEADLETTER" >/dev/null 2>&1 || true
    if [ "$rc" -ne 0 ] && [ -f "$WORK/server.log" ]; then
        echo "--- last server log lines ($WORK/server.log) ---" >&2
        tail -n 30 "$WORK/server.log" >&2 || true
        cp "$WORK/server.log" "$REPORT_DIR/server.log" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql "$ADMIN_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$DB\"" >/dev/null \
    || die "cannot create database $DB via $ADMIN_URL"
DB_URL="${ADMIN_URL%/*}/$DB"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
mkdir -p "$WORK/media" "$REPORT_DIR"

# Random secrets: the run proves nothing depends on the development ones.
JWT_SECRET="st-$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
INTERNAL_TOKEN="st-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
export APP_ENV=development
export DATABASE_URL="$DB_URL"
export REDIS_URL="$REDIS"
export AUTH_JWT_SECRET="$JWT_SECRET"
export INTERNAL_METRICS_TOKEN="$INTERNAL_TOKEN"
export TELEMETRY_ENABLED=false
export LOG_LEVEL="${LOG_LEVEL:-info}"
export MEDIA_CLUSTERING__SERVER__BIND="127.0.0.1:$PORT"
export MEDIA_CLUSTERING__REDIS__STREAM="$STREAM"
export MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM="$DEADLETTER"
export MEDIA_CLUSTERING__STORAGE__URL="file://$WORK/media"
export MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH="$ROOT/models/open-nsfw-int8.onnx"
# Schemathesis is one fast caller: a high limit keeps the limiter in the path without
# turning most answers into 429 (the limit itself has its own integration test).
export MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND="${ST_RATE_LIMIT:-1000}"
export MEDIA_CLUSTERING__RATE_LIMIT__BURST="${ST_RATE_BURST:-2000}"

say "starting $BIN serve on $BASE (database $DB)"
"$BIN" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for i in $(seq 1 240); do
    if curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited during start-up"
    [ "$i" -lt 240 ] || die "the server was not ready after 120 s"
    sleep 0.5
done
TOKEN="$("$BIN" token --sub schemathesis --ttl 7200)"

# Seed one pet with real photos and wait for its clustering, so that generated requests
# also reach real jobs, clusterings and images (half of the ids come from these).
SEED_PET="st-seed"
say "seeding pet $SEED_PET with 3 fixture photos"
FIX="$ROOT/tests/fixtures/photos"
curl -fsS -H "Authorization: Bearer $TOKEN" -o "$WORK/seed.json" \
    -F "file=@$FIX/astronaut__orig.png" -F "file=@$FIX/astronaut__flip.png" \
    -F "file=@$FIX/coffee__orig.png" "$BASE/v1/pets/$SEED_PET/images" \
    || die "seeding upload failed"
JOB_ID="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["job_id"])' "$WORK/seed.json")"
IMAGE_IDS="$(python3 -c 'import json,sys; print(", ".join(json.dumps(i["image_id"]) for i in json.load(open(sys.argv[1]))["images"]))' "$WORK/seed.json")"
for i in $(seq 1 240); do
    STATUS="$(curl -fsS -H "Authorization: Bearer $TOKEN" "$BASE/v1/jobs/$JOB_ID" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')"
    case "$STATUS" in
        succeeded) break ;;
        failed|dead_lettered) die "seed job $JOB_ID ended $STATUS" ;;
    esac
    [ "$i" -lt 240 ] || die "seed job $JOB_ID not finished after 120 s (status $STATUS)"
    sleep 0.5
done
curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" "$BASE/v1/pets/$SEED_PET/clusters" \
    || die "the seeded pet has no clustering"

# Per security scheme of the document: the JWT for /v1, the internal token for /internal.
cat >"$WORK/schemathesis.toml" <<EOF
[auth.openapi.jwt]
bearer = "$TOKEN"

[auth.openapi.internal_token]
bearer = "$INTERNAL_TOKEN"

[dictionaries.pets]
values = ["$SEED_PET"]

[dictionaries.jobs]
values = ["$JOB_ID"]

[dictionaries.images]
values = [$IMAGE_IDS]

[parameters]
"path.pet_id" = { dictionary = "pets", probability = 0.3 }
"path.job_id" = { dictionary = "jobs", probability = 0.5 }
"path.image_id" = { dictionary = "images", probability = 0.5 }

# "Valid" per the schema is any bytes with an image content type; only real JPEG, PNG
# or WebP bytes are accepted (415/422 otherwise, 400 for an empty file), which a schema
# cannot express.
[[operations]]
include-operation-id = "upload_images"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "413", "415", "422", "429"]

# A pet without photos cannot be reclustered: 404.
[[operations]]
include-operation-id = "recluster"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "429"]
EOF

SEED_ARGS=()
[ -n "${ST_SEED:-}" ] && SEED_ARGS=(--seed "$ST_SEED")
say "running schemathesis (checks: all; up to $MAX_EXAMPLES examples per operation)"
set +e
"$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" --no-color run "$BASE/openapi.json" \
    --checks all \
    --max-examples "$MAX_EXAMPLES" \
    --workers 2 \
    --request-timeout 30 \
    --max-response-time 20 \
    --report junit --report-junit-path "$REPORT_DIR/junit.xml" \
    "${SEED_ARGS[@]}" "$@"
ST_RC=$?
set -e

# The service must have stayed up and healthy through the run.
SERVER_OK=1
kill -0 "$SERVER_PID" 2>/dev/null || SERVER_OK=0
curl -fsS -o /dev/null "$BASE/healthz" 2>/dev/null || SERVER_OK=0
PANICS="$(grep -c -i 'panicked' "$WORK/server.log" || true)"

echo
echo "==> schemathesis summary"
echo "    schemathesis exit code: $ST_RC ($([ "$ST_RC" -eq 0 ] && echo "no failures" || echo "FAILURES, see above"))"
echo "    server alive after the run: $([ "$SERVER_OK" -eq 1 ] && echo yes || echo NO)"
echo "    panics in the server log: $PANICS"
echo "    JUnit report: $REPORT_DIR/junit.xml"
if [ "$ST_RC" -ne 0 ] || [ "$SERVER_OK" -ne 1 ] || [ "$PANICS" != "0" ]; then
    echo "==> schemathesis: FAILED"
    exit 1
fi
echo "==> schemathesis: passed"
