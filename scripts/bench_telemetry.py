#!/usr/bin/env python3
"""Telemetry overhead: the same batches of jobs with TELEMETRY_ENABLED=false and with
full tracing (sample rate 1.0) exporting to a live OTLP receiver, alternated in one run.

Usage (from the repo root): python3 scripts/bench_telemetry.py [ROUNDS]
Env: BIN (default target/release/media-clustering, else target/debug), OTELTAP
(default target/pytools/bin/oteltap). Needs Redis and Postgres (make services)
and the model (make model). Prints per-round job processing times and the ratio.
"""
import json, os, re, socket, statistics, subprocess, sys, tempfile, time, urllib.request, uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
BIN = os.environ.get("BIN") or next(b for b in ("target/release/media-clustering", "target/debug/media-clustering") if os.path.exists(b))
OTELTAP = os.environ.get("OTELTAP", "target/pytools/bin/oteltap")
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
PHOTOS = sorted(os.path.join("tests/fixtures/photos", f) for f in os.listdir("tests/fixtures/photos") if f.endswith((".png", ".jpg")))[:12]


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def psql(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", sql], check=True, capture_output=True)


def metric(base, token, name):
    req = urllib.request.Request(base + "/internal/metrics", headers={"Authorization": "Bearer " + token})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    m = re.search(r"^" + re.escape(name) + r"(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def run_batch(telemetry, tap_port, tmp):
    db = "bench_tel_" + uuid.uuid4().hex[:10]
    psql(f"CREATE DATABASE {db}")
    port = free_port()
    env = dict(os.environ,
               DATABASE_URL=f"postgres://postgres:postgres@127.0.0.1:5432/{db}", REDIS_URL="redis://127.0.0.1:6379/0",
               MEDIA_CLUSTERING__REDIS__STREAM=f"bench:{db}:jobs", MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM=f"bench:{db}:dl",
               MEDIA_CLUSTERING__STORAGE__URL=f"file://{tmp}/{db}", MEDIA_CLUSTERING__SERVER__BIND=f"127.0.0.1:{port}",
               MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH=os.path.join(ROOT, "models/open-nsfw.onnx"),
               MEDIA_CLUSTERING__ACTORS__EMBEDDERS="1", LOG_LEVEL="warn",
               TELEMETRY_ENABLED="true" if telemetry else "false", TRACE_SAMPLE_RATE="1.0",
               OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{tap_port}")
    subprocess.run([BIN, "migrate"], env=env, check=True, capture_output=True)
    serve = subprocess.Popen([BIN, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1); break
            except Exception:
                time.sleep(0.1)
        t0 = time.monotonic()
        subprocess.run([BIN, "upload", "--server", base, "--pet", "bench-pet", "--batch", "4", *PHOTOS], env=env, check=True, capture_output=True)
        wall = time.monotonic() - t0
        token = "dev-internal-token"
        processing = metric(base, token, "media_cluster_processing_duration_seconds_sum")
        jobs = metric(base, token, "media_cluster_processing_duration_seconds_count")
        embed = metric(base, token, "media_cluster_embedding_duration_seconds_sum")
        return wall, processing, jobs, embed
    finally:
        serve.terminate(); serve.wait(timeout=60)
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        subprocess.run(["redis-cli", "DEL", f"bench:{db}:jobs", f"bench:{db}:dl"], capture_output=True)


def main():
    tmp = tempfile.mkdtemp(prefix="bench-tel-")
    tap_port = free_port()
    tap = subprocess.Popen([OTELTAP, "--port", str(tap_port)], stdout=open(os.path.join(tmp, "spans.ndjson"), "w"), stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    rows = {False: [], True: []}
    try:
        for r in range(ROUNDS):
            for telemetry in (False, True) if r % 2 == 0 else (True, False):
                wall, processing, jobs, embed = run_batch(telemetry, tap_port, tmp)
                rows[telemetry].append((wall, processing, jobs, embed))
                print(f"round {r + 1} telemetry={'on ' if telemetry else 'off'} wall {wall:6.2f} s  "
                      f"job processing {processing:6.2f} s over {int(jobs)} jobs  embedding {embed:6.2f} s", flush=True)
    finally:
        tap.terminate(); tap.wait()
    spans = sum(1 for _ in open(os.path.join(tmp, "spans.ndjson")))
    med = lambda xs: statistics.median(xs)
    off_p, on_p = med([x[1] for x in rows[False]]), med([x[1] for x in rows[True]])
    off_w, on_w = med([x[0] for x in rows[False]]), med([x[0] for x in rows[True]])
    print(f"\nbinary {BIN}; {len(PHOTOS)} photos per batch in 3 jobs; {ROUNDS} rounds per mode, alternated")
    print(f"median job processing time: off {off_p:.3f} s, on {on_p:.3f} s, ratio on/off {on_p / off_p:.3f}")
    print(f"median batch wall time:     off {off_w:.3f} s, on {on_w:.3f} s, ratio on/off {on_w / off_w:.3f}")
    print(f"spans received by the OTLP receiver: {spans}")


if __name__ == "__main__":
    main()
