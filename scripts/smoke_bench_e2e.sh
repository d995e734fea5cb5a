#!/usr/bin/env bash
# Smoke test of the end-to-end benchmark (part of `make test`): a tiny run of
# scripts/bench_e2e.py, closed and open loop, against the debug binary, then a check that the
# report has every figure BENCHMARKS.md quotes, each a number in range. It measures nothing:
# the figures come from `make bench` on the release binary.
# Usage: scripts/smoke_bench_e2e.sh PYTHON BIN   (PYTHON: an interpreter with psycopg)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$1"
BIN="$2"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/photos"
# Three photos of two formats are enough to exercise every stage.
ls "$ROOT/tests/fixtures/photos" | grep -E '\.(jpe?g|png)$' | head -3 \
    | while read -r f; do cp "$ROOT/tests/fixtures/photos/$f" "$WORK/photos/"; done

"$PY" "$ROOT/scripts/bench_e2e.py" --bin "$BIN" --model "$ROOT/models/open-nsfw-int8.onnx" \
    --photos "$WORK/photos" --pets 2 --batch 2 --cpu-seconds 1 --no-reference \
    --rates 2 --open-batch 1 --open-seconds 2 --json "$WORK/report.json" >"$WORK/report.md"

"$PY" - "$WORK/report.json" <<'PY'
import json, sys

r = json.load(open(sys.argv[1]))
problems = []

def number(path, v, lo=0.0, hi=float("inf")):
    if not isinstance(v, (int, float)) or not (lo <= v <= hi):
        problems.append(f"{path} = {v!r}, want a number in [{lo}, {hi}]")

def run(path, x, photos):
    number(f"{path}.photos", x["photos"], photos, photos)
    number(f"{path}.photos_per_s", x["photos_per_s"], 1e-6)
    if x["jobs"] != {"succeeded": x["requests"]}:
        problems.append(f"{path}.jobs = {x['jobs']}, want every one of {x['requests']} succeeded")
    for q in ("p50", "p95", "p99"):
        number(f"{path}.latency_s.{q}", x["latency_s"][q], 1e-6)
    if not x["latency_s"]["p50"] <= x["latency_s"]["p95"] <= x["latency_s"]["p99"]:
        problems.append(f"{path}.latency_s not ordered: {x['latency_s']}")
    for actor in ("embedder", "clusterer", "hero_selector", "postgres_writer", "stream_reader"):
        for col in ("wait", "handling"):
            h = x["actors"].get(actor, {}).get(col)
            if h is None:
                problems.append(f"{path}.actors.{actor}.{col} missing")
                continue
            number(f"{path}.actors.{actor}.{col}.count", h["count"], 1)
            for q in ("p50", "p95", "p99"):
                number(f"{path}.actors.{actor}.{col}.{q}", h[q])
    number(f"{path}.cpu_total_s", x["cpu_total_s"], 1e-3)
    if not any(k.startswith("embedder") for k in x["cpu_s"]):
        problems.append(f"{path}.cpu_s has no embedder threads: {sorted(x['cpu_s'])}")
    number(f"{path}.peak_rss_mib", x["peak_rss_mib"], 1, 8192)
    number(f"{path}.machine_busy", x["machine_busy"], 0, 1.5)

per_pet = r["photos_per_pet"]
if len(r["sweep"]) != 1 or len(r["open"]) != 1:
    problems.append(f"want one closed and one open run, got {len(r['sweep'])} and {len(r['open'])}")
for i, s in enumerate(r["sweep"]):
    run(f"sweep[{i}].result", s["result"], r["pets"] * per_pet)
    number(f"sweep[{i}].cpu_bound.photos_per_second", s["cpu_bound"]["photos_per_second"], 1e-6)
    number(f"sweep[{i}].result.fraction_of_cpu_bound", s["result"]["fraction_of_cpu_bound"], 1e-6)
for i, o in enumerate(r["open"]):
    run(f"open[{i}].result", o["result"], o["result"]["photos"])
if problems:
    sys.exit("bench_e2e report:\n  " + "\n  ".join(problems))
print("smoke_bench_e2e: the report has every figure")
PY
