#!/usr/bin/env python3
"""Telemetry overhead: the same batches of jobs with TELEMETRY_ENABLED=false and with
full tracing (sample rate 1.0) exporting to a live OTLP receiver, alternated in one run.

Usage (from the repo root): python3 scripts/bench_telemetry.py [ROUNDS] [--tls grpc|http]
  --tls: export over TLS instead, with gzip and a header, to tests/it/tls_receiver.py (gRPC or
         HTTP/protobuf) behind a certificate of a private CA made with openssl for the run
         (OTEL_EXPORTER_OTLP_CERTIFICATE), as a managed backend is reached.
Env: BIN (default target/release/media-clustering, else target/debug), OTELTAP
(default target/pytools/bin/oteltap), PYTOOLS_PYTHON (default target/pytools/bin/python, with
grpcio and opentelemetry-proto). Needs Redis and Postgres (make services) and the model (make
model). Prints per-round job processing times, the ratio on/off and a 95 % bootstrap
confidence interval of the mean of the rounds' paired ratios.
"""
import json, os, random, re, socket, statistics, subprocess, sys, tempfile, time, urllib.request, uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
BIN = os.environ.get("BIN") or next(b for b in ("target/release/media-clustering", "target/debug/media-clustering") if os.path.exists(b))
OTELTAP = os.environ.get("OTELTAP", "target/pytools/bin/oteltap")
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
ROUNDS = int(ARGS[0]) if ARGS else 4
TLS = sys.argv[sys.argv.index("--tls") + 1] if "--tls" in sys.argv else None
PYTHON = os.environ.get("PYTOOLS_PYTHON", "target/pytools/bin/python")
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


def make_pki(tmp):
    """A CA and a server certificate for 127.0.0.1, made for the run."""
    def ossl(*a):
        subprocess.run(["openssl", *a], cwd=tmp, check=True, capture_output=True)
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench-ca", "-keyout", "ca.key", "-out", "ca.pem")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bench-server", "-keyout", "server.key", "-out", "server.csr")
    open(os.path.join(tmp, "server.ext"), "w").write("subjectAltName=IP:127.0.0.1")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
         "-extfile", "server.ext", "-out", "server.pem")
    return [os.path.join(tmp, f) for f in ("ca.pem", "server.pem", "server.key")]


def export_env(tap_port, tmp):
    if TLS is None:
        return dict(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{tap_port}")
    return dict(OTEL_EXPORTER_OTLP_PROTOCOL="grpc" if TLS == "grpc" else "http/protobuf",
                OTEL_EXPORTER_OTLP_ENDPOINT=f"https://127.0.0.1:{tap_port}",
                OTEL_EXPORTER_OTLP_CERTIFICATE=os.path.join(tmp, "ca.pem"),
                OTEL_EXPORTER_OTLP_COMPRESSION="gzip", OTEL_EXPORTER_OTLP_HEADERS="api-key=bench")


def run_batch(telemetry, tap_port, tmp):
    db = "bench_tel_" + uuid.uuid4().hex[:10]
    psql(f"CREATE DATABASE {db}")
    port = free_port()
    env = dict(os.environ,
               DATABASE_URL=f"postgres://postgres:postgres@127.0.0.1:5432/{db}", REDIS_URL="redis://127.0.0.1:6379/0",
               MEDIA_CLUSTERING__REDIS__STREAM=f"bench:{db}:jobs", MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM=f"bench:{db}:dl",
               MEDIA_CLUSTERING__STORAGE__URL=f"file://{tmp}/{db}", MEDIA_CLUSTERING__SERVER__BIND=f"127.0.0.1:{port}",
               MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH=os.path.join(ROOT, "models/open-nsfw-int8.onnx"),
               MEDIA_CLUSTERING__ACTORS__EMBEDDERS="1", LOG_LEVEL="warn",
               TELEMETRY_ENABLED="true" if telemetry else "false", TRACE_SAMPLE_RATE="1.0",
               **export_env(tap_port, tmp))
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
        # The service's CPU time (user + system) over its whole life, model load included.
        f = open(f"/proc/{serve.pid}/stat").read().rsplit(")", 1)[1].split()
        cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        return wall, processing, jobs, embed, cpu
    finally:
        serve.terminate(); serve.wait(timeout=60)
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        subprocess.run(["redis-cli", "DEL", f"bench:{db}:jobs", f"bench:{db}:dl"], capture_output=True)


def main():
    tmp = tempfile.mkdtemp(prefix="bench-tel-")
    tap_port = free_port()
    out = open(os.path.join(tmp, "spans.ndjson"), "w")
    if TLS is None:
        tap = subprocess.Popen([OTELTAP, "--port", str(tap_port)], stdout=out, stderr=subprocess.DEVNULL)
    else:
        _, cert, key = make_pki(tmp)
        tap = subprocess.Popen([PYTHON, "tests/it/tls_receiver.py", TLS, str(tap_port), cert, key], stdout=out, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", tap_port), timeout=1).close(); break
        except OSError:
            time.sleep(0.1)
    rows = {False: [], True: []}
    try:
        for r in range(ROUNDS):
            for telemetry in (False, True) if r % 2 == 0 else (True, False):
                wall, processing, jobs, embed, cpu = run_batch(telemetry, tap_port, tmp)
                rows[telemetry].append((wall, processing, jobs, embed, cpu))
                print(f"round {r + 1} telemetry={'on ' if telemetry else 'off'} wall {wall:6.2f} s  "
                      f"job processing {processing:6.2f} s over {int(jobs)} jobs  embedding {embed:6.2f} s  "
                      f"service CPU {cpu:6.2f} s", flush=True)
    finally:
        tap.terminate(); tap.wait()
    lines = open(os.path.join(tmp, "spans.ndjson")).read().splitlines()
    spans = sum(1 for l in lines if l and not l.startswith(("request ", "listening")))
    med = lambda xs: statistics.median(xs)
    off_p, on_p = med([x[1] for x in rows[False]]), med([x[1] for x in rows[True]])
    off_w, on_w = med([x[0] for x in rows[False]]), med([x[0] for x in rows[True]])
    print(f"\nbinary {BIN}; {len(PHOTOS)} photos per batch in 3 jobs; {ROUNDS} rounds per mode, alternated")
    print(f"median job processing time: off {off_p:.3f} s, on {on_p:.3f} s, ratio on/off {on_p / off_p:.3f}")
    print(f"median batch wall time:     off {off_w:.3f} s, on {on_w:.3f} s, ratio on/off {on_w / off_w:.3f}")
    # Rounds are alternated in pairs, so pair them and resample the pairs' ratios.
    rng = random.Random(1)
    for label, k in (("job processing", 1), ("service CPU", 4)):
        pairs = [on[k] / off[k] for on, off in zip(rows[True], rows[False])]
        means = sorted(statistics.fmean(rng.choices(pairs, k=len(pairs))) for _ in range(10000))
        print(f"paired ratio on/off ({label}): mean {statistics.fmean(pairs):.3f}, "
              f"95 % bootstrap interval [{means[249]:.3f}, {means[9749]:.3f}] over {len(pairs)} pairs")
    print(f"export: {'OTLP over TLS (' + TLS + ', gzip, private CA)' if TLS else 'OTLP/HTTP, plain'}; "
          f"spans received by the receiver: {spans}")


if __name__ == "__main__":
    main()
