#!/usr/bin/env bash
# Prove every PromQL expression of deploy/grafana/dashboards/media-clustering.json returns data:
# run `serve` (fresh database, stream and storage), let a real Prometheus scrape it, upload the
# fixture photos as a real job, then run each dashboard expression as an instant query.
# Usage (from the repo root): scripts/check-dashboard.sh
#   env: BIN (default target/debug/media-clustering), DASHBOARD, CHECK_RATE_INTERVAL (default 5m),
#        CHECK_TIMEOUT (seconds per wait, default 120), KEEP_TMP=1 (keep logs and TSDB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BIN="${BIN:-target/debug/media-clustering}"
DASHBOARD="${DASHBOARD:-deploy/grafana/dashboards/media-clustering.json}"
PHOTOS="tests/fixtures/photos"
RATE_INTERVAL="${CHECK_RATE_INTERVAL:-5m}"
WAIT_SECS="${CHECK_TIMEOUT:-120}"
PG_ADMIN=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -X -q -v ON_ERROR_STOP=1)
export PGPASSWORD="${PGPASSWORD:-postgres}"

log() { echo "check-dashboard: $*"; }
die() { echo "check-dashboard: ERROR: $*" >&2; exit 1; }

# shellcheck source=scripts/as_root.sh
source "$(dirname "${BASH_SOURCE[0]}")/as_root.sh"

# ------------------------------------------------------------ prerequisites

[ -x "$BIN" ] || die "binary not found at $BIN; run \`cargo build --bin media-clustering\` first (or set BIN)"
[ -f "$DASHBOARD" ] || die "dashboard not found: $DASHBOARD"
[ -d "$PHOTOS" ] || die "fixture photos not found: $PHOTOS"
command -v python3 >/dev/null 2>&1 || die "python3 is required"

missing=()
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and apt-get is not available; install them manually"
    log "installing ${missing[*]} with apt-get"
    apt_log="$(mktemp)"
    if ! { as_root env DEBIAN_FRONTEND=noninteractive apt-get update \
           && as_root env DEBIAN_FRONTEND=noninteractive \
                  apt-get install -y --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$apt_log"
    # The Debian package may start its own service on :9090; we use our own instance and port.
    command -v prometheus >/dev/null 2>&1 || die "prometheus still missing after apt-get install"
fi

scripts/ensure-services.sh
scripts/fetch-model.sh

# ------------------------------------------------------------------- state

rand="$(python3 -c 'import secrets; print(secrets.token_hex(5))')"
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
DB="dash_${rand}"
STREAM="dash:${rand}:jobs"
DL_STREAM="dash:${rand}:dl"
PORT="$(free_port)"
PROM_PORT="$(free_port)"
while [ "$PROM_PORT" = "$PORT" ]; do PROM_PORT="$(free_port)"; done
BASE="http://127.0.0.1:$PORT"
PROM="http://127.0.0.1:$PROM_PORT"
METRICS_TOKEN="dash-metrics-token-${rand}"

SERVE_PID=""
PROM_PID=""
DB_CREATED=0
TMP=""
CHECKING=0 # set once the queries run: their output says what failed, the logs would not

stop_pid() { # stop_pid PID NAME SECONDS
    local pid="$1" name="$2" secs="$3" i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 5; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop after ${secs}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +eu
    if [ "$rc" -ne 0 ] && [ "$CHECKING" -eq 0 ]; then
        for f in serve.log prometheus.log upload.log; do
            if [ -s "$TMP/$f" ]; then
                echo "---- last lines of $f" >&2
                tail -n 30 "$TMP/$f" >&2
            fi
        done
    fi
    stop_pid "$SERVE_PID" "serve" 35
    stop_pid "$PROM_PID" "prometheus" 15
    if [ "$DB_CREATED" -eq 1 ]; then
        "${PG_ADMIN[@]}" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 \
            || echo "check-dashboard: warning: could not drop database $DB" >&2
    fi
    redis-cli -u "$REDIS_URL" DEL "$STREAM" "$DL_STREAM" >/dev/null 2>&1 \
        || echo "check-dashboard: warning: could not delete streams $STREAM $DL_STREAM" >&2
    if [ -z "$TMP" ]; then
        :
    elif [ "${KEEP_TMP:-0}" = 1 ]; then
        echo "check-dashboard: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
TMP="$(mktemp -d "${TMPDIR:-/tmp}/check-dashboard.XXXXXX")"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$TMP/media" "$TMP/tsdb"

export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/$DB"
export REDIS_URL="redis://127.0.0.1:6379/0"
export MEDIA_CLUSTERING__REDIS__STREAM="$STREAM"
export MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM="$DL_STREAM"
export MEDIA_CLUSTERING__STORAGE__URL="file://$TMP/media"
export MEDIA_CLUSTERING__SERVER__BIND="127.0.0.1:$PORT"
export MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH="$ROOT/models/open-nsfw-int8.onnx"
export AUTH_JWT_SECRET="dash-jwt-secret-${rand}-0123456789abcdef"
export INTERNAL_METRICS_TOKEN="$METRICS_TOKEN"
# Traces on, so that histogram exemplars carry trace ids; the spans go to a closed port (the
# export failures are counted, never fatal): this check reads trace ids from the jobs table.
export TELEMETRY_ENABLED=true
export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"
export OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
export TRACE_SAMPLE_RATE=1.0
export LOG_LEVEL=warn

# wait_until DESCRIPTION COMMAND...: poll every 0.5s for up to WAIT_SECS.
wait_until() {
    local what="$1" deadline=$((SECONDS + WAIT_SECS))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${WAIT_SECS}s waiting for $what"
        sleep 0.5
    done
}

alive() { # alive PID NAME LOG: fail at once if a background process died
    kill -0 "$1" 2>/dev/null || die "$2 exited unexpectedly (log: $3)"
}

# ---------------------------------------------------------------- service

log "database $DB, streams $STREAM / $DL_STREAM, service $BASE, prometheus $PROM"
"${PG_ADMIN[@]}" -c "CREATE DATABASE \"$DB\"" >/dev/null || die "cannot create database $DB"
DB_CREATED=1
"$BIN" migrate >"$TMP/migrate.log" 2>&1 || { cat "$TMP/migrate.log" >&2; die "$BIN migrate failed"; }

"$BIN" serve >"$TMP/serve.log" 2>&1 &
SERVE_PID=$!
healthy() {
    alive "$SERVE_PID" serve "$TMP/serve.log"
    curl -fsS -o /dev/null --max-time 2 "$BASE/healthz" 2>/dev/null
}
wait_until "$BASE/healthz" healthy
log "service is healthy"
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $METRICS_TOKEN" "$BASE/internal/metrics" \
    || die "GET $BASE/internal/metrics with the metrics token failed"

# -------------------------------------------------------------- prometheus

cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: media-clustering
    metrics_path: /internal/metrics
    authorization:
      type: Bearer
      credentials: $METRICS_TOKEN
    static_configs:
      - targets: ["127.0.0.1:$PORT"]
EOF
promtool check config "$TMP/prometheus.yml" >/dev/null || die "generated prometheus.yml is invalid"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
    --enable-feature=exemplar-storage \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!

# prom_value QUERY: first sample value of an instant query, empty if none.
prom_value() {
    curl -fsS --max-time 5 -G "$PROM/api/v1/query" --data-urlencode "query=$1" 2>/dev/null \
        | python3 -c 'import json, sys
r = json.load(sys.stdin)["data"]["result"]
print(r[0]["value"][1] if r else "")' 2>/dev/null
}
prom_ready() {
    alive "$PROM_PID" prometheus "$TMP/prometheus.log"
    curl -fsS -o /dev/null --max-time 2 "$PROM/-/ready" 2>/dev/null
}
scraped() { # the target is up and the service's metrics are in the TSDB
    alive "$SERVE_PID" serve "$TMP/serve.log"
    [ "$(prom_value 'up{job="media-clustering"}')" = 1 ] \
        && [ -n "$(prom_value 'media_cluster_jobs_total{status="succeeded"}')" ]
}
wait_until "prometheus at $PROM" prom_ready
wait_until "prometheus to scrape $BASE/internal/metrics" scraped
log "prometheus is scraping the service"

# ---------------------------------------------------------------------- job

log "uploading $PHOTOS"
if ! "$BIN" upload --server "$BASE" --pet dash-pet --timeout 300 "$PHOTOS" >"$TMP/upload.log" 2>&1; then
    die "upload failed"
fi
grep -E 'photos uploaded|clusters \(version' "$TMP/upload.log" | sed 's/^/  upload: /' || true

# service_value METRIC_LINE_PREFIX: value of one series as the service reports it now.
service_value() {
    curl -fsS --max-time 5 -H "Authorization: Bearer $METRICS_TOKEN" "$BASE/internal/metrics" \
        | awk -v k="$1" '$1 == k && !found { print $2; found = 1 }'
}
# stream_backlog: entries of the job stream not yet delivered (lag) or not yet acknowledged (pending),
# straight from Redis (the service samples its pending_jobs gauge only every few seconds).
stream_backlog() {
    redis-cli -u "$REDIS_URL" XINFO GROUPS "$STREAM" 2>/dev/null \
        | awk 'take { n += $1; take = 0 } $1 == "pending" || $1 == "lag" { take = 1 } END { print n + 0 }'
}
settled() { # no job in flight and nothing left in the stream
    alive "$SERVE_PID" serve "$TMP/serve.log"
    [ "$(service_value media_cluster_worker_inflight)" = 0 ] && [ "$(stream_backlog)" = 0 ]
}
wait_until "the service to finish its jobs" settled
SUCCEEDED="$(service_value 'media_cluster_jobs_total{status="succeeded"}')"
{ [ -n "$SUCCEEDED" ] && [ "$SUCCEEDED" != 0 ]; } || die "service reports no succeeded job (got '${SUCCEEDED}')"
caught_up() { # prometheus holds the final succeeded count and the drained queue
    local v
    v="$(prom_value 'sum(media_cluster_jobs_total{status="succeeded"})')"
    [ -n "$v" ] && python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) > 0 else 1)' "$v" "$SUCCEEDED" \
        && [ "$(prom_value 'sum(media_cluster_pending_jobs) + sum(media_cluster_worker_inflight)')" = 0 ]
}
wait_until "prometheus to scrape the finished jobs" caught_up
log "service reports $SUCCEEDED succeeded job(s); prometheus has scraped them"

# --------------------------------------------------------------- exemplars

# Prometheus scrapes OpenMetrics, keeps the exemplars, and the job's own trace is among them.
JOB_TRACES="$(psql -h 127.0.0.1 -p 5432 -U postgres -d "$DB" -X -A -t -v ON_ERROR_STOP=1 \
    -c "SELECT trace_id FROM jobs WHERE status = 'succeeded' AND trace_id IS NOT NULL")"
[ -n "$JOB_TRACES" ] || die "no succeeded job has a trace id"
# exemplar_traces METRIC: trace ids of the exemplars Prometheus holds for METRIC's buckets.
exemplar_traces() {
    curl -fsS --max-time 5 -G "$PROM/api/v1/query_exemplars" \
        --data-urlencode "query=$1" --data-urlencode "start=$(($(date +%s) - 3600))" \
        --data-urlencode "end=$(($(date +%s) + 60))" 2>/dev/null \
        | python3 -c 'import json, sys
for series in json.load(sys.stdin)["data"]:
    for e in series["exemplars"]:
        print(e["labels"].get("trace_id", ""))' 2>/dev/null
}
job_exemplar() { # an exemplar of METRIC is one of the jobs' traces
    exemplar_traces "$1" | grep -qxF -f <(printf '%s\n' "$JOB_TRACES")
}
any_exemplar() { [ -n "$(exemplar_traces "$1")" ]; }
for m in media_cluster_processing_duration_seconds_bucket media_cluster_embedding_duration_seconds_bucket; do
    wait_until "an exemplar of $m with a job's trace id" job_exemplar "$m"
    log "exemplar ok: $m links to a job's trace"
done
for m in media_cluster_postgres_write_seconds_bucket media_cluster_actor_handling_seconds_bucket; do
    wait_until "an exemplar of $m" any_exemplar "$m"
    log "exemplar ok: $m has trace ids"
done

# ------------------------------------------------------------------ checks

# $__range: everything Prometheus has seen, plus a margin.
RANGE="$((SECONDS + 60))s"
CHECKING=1
python3 - "$DASHBOARD" "$PROM" "$RATE_INTERVAL" "$RANGE" <<'PY'
import json, math, re, sys, urllib.parse, urllib.request

path, prom, rate_interval, range_ = sys.argv[1:5]
problems = []

with open(path) as f:
    dash = json.load(f)  # must parse

# ---- structure
for key, want in (("uid", "media-clustering"), ("title", "Media clustering")):
    if dash.get(key) != want:
        problems.append(f"dashboard {key} is {dash.get(key)!r}, want {want!r}")
if not isinstance(dash.get("schemaVersion"), int):
    problems.append("dashboard has no schemaVersion")

def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))

def is_prom(ds):
    # The datasource variable, whose only choices are Prometheus datasources.
    return isinstance(ds, dict) and ds.get("type") == "prometheus" and ds.get("uid") == "${datasource}"

panels = list(all_panels(dash.get("panels", [])))
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)):
    problems.append("panel ids are not unique")
exprs = []  # (panel title, refId, expr)
for p in panels:
    if p.get("type") == "row":
        continue
    title = p.get("title", "?")
    if not is_prom(p.get("datasource")):
        problems.append(f"panel {title!r}: datasource is not the prometheus uid 'prometheus'")
    if "gridPos" not in p:
        problems.append(f"panel {title!r}: no gridPos")
    targets = p.get("targets") or []
    if not targets:
        problems.append(f"panel {title!r}: no targets")
    for t in targets:
        if not is_prom(t.get("datasource", p.get("datasource"))):
            problems.append(f"panel {title!r} target {t.get('refId')}: datasource is not prometheus")
        if not (t.get("expr") or "").strip():
            problems.append(f"panel {title!r} target {t.get('refId')}: empty expr")
            continue
        exprs.append((title, t.get("refId", "?"), t["expr"]))

variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds = variables.get("datasource")
if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    problems.append("no templating variable 'datasource' of Prometheus datasources")
for name in ("instance", "model_version", "actor"):
    v = variables.get(name)
    if not v:
        problems.append(f"no templating variable {name!r}")
        continue
    if not (v.get("multi") and v.get("includeAll")):
        problems.append(f"variable {name} must be multi-value with 'All'")
    if not is_prom(v.get("datasource")):
        problems.append(f"variable {name}: datasource is not the datasource variable")
print(f"dashboard: {len(panels)} panels, {len(exprs)} expressions, structure "
      + ("ok" if not problems else "BROKEN"))

# ---- queries
def query(expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]

def substitute(expr):
    e = re.sub(r"\$\{(actor|instance|model_version)(:[a-z]+)?\}|\$(actor|instance|model_version)\b", ".*", expr)
    e = e.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    e = re.sub(r"\$\{?__range\}?(?![_a-z])", range_, e)
    e = re.sub(r"\$\{?__interval\}?(?![_a-z])", "15s", e)
    left = re.findall(r"\$\{?\w+", e)
    if left:
        raise RuntimeError(f"unsubstituted variable(s) {', '.join(sorted(set(left)))}")
    return e

failed = 0
for title, ref, expr in exprs:
    e = expr
    try:
        e = substitute(expr)
        data = query(e)
        res = data["result"]
        if data["resultType"] == "scalar":
            res = [{"value": res}]
        vals = [float(s["value"][1]) for s in res]
        finite = [v for v in vals if not math.isnan(v)]
        if not res:
            status, detail = "EMPTY", "no series"
        elif not finite:
            status, detail = "EMPTY", f"{len(res)} series, all NaN"
        else:
            status = "ok"
            nan = len(vals) - len(finite)
            detail = f"{len(res)} series" + (f" ({nan} NaN)" if nan else "") \
                + f", max {max(finite):.4g}"
    except Exception as ex:  # noqa: BLE001 - report every failure per expression
        status, detail = "ERROR", str(ex)
    if status != "ok":
        failed += 1
    print(f"{status:<5} {title} [{ref}] {detail}: {e}")

# The query variables, as Grafana resolves label_values(METRIC{...}, LABEL).
want = {"supervisor", "stream_reader", "pet_scheduler", "embedder", "clusterer", "hero_selector", "postgres_writer"}
for name in ("instance", "model_version", "actor"):
    v = variables.get(name) or {}
    m = re.fullmatch(r"label_values\((.+), *(\w+)\)", (v.get("query") or {}).get("query", ""))
    if not m:
        failed += 1
        print(f"ERROR variable {name}: query is not label_values(SELECTOR, LABEL)")
        continue
    selector, label = substitute(m.group(1)), m.group(2)
    url = f"{prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector})
    with urllib.request.urlopen(url, timeout=30) as r:
        got = set(json.load(r)["data"])
    ok = want <= got if name == "actor" else bool(got)
    if not ok:
        failed += 1
    print(f"{'ok' if ok else 'EMPTY':<5} variable {name}: label_values({selector}, {label}) = {sorted(got)}")

for p in problems:
    print(f"BROKEN {p}")
if failed or problems:
    print(f"FAILED: {failed} expression(s) without data, {len(problems)} structural problem(s)")
    sys.exit(1)
print(f"PASSED: all {len(exprs)} expressions returned data")
PY
