#!/usr/bin/env python3
"""Per-job cost against library size: a pet with N clustered photos already embedded gets a
job adding K new photos; reports the job's time (delivery to commit, from the jobs table),
the service's peak resident memory and the rows the commit wrote.

Usage (from the repo root): python3 scripts/bench_library.py [N ...] [--modes incremental,full] [--add K ...]
  (default N: 1000 10000, K: 1 10, both modes)
Env: BIN (default target/release/media-clustering). Needs Redis and Postgres (make services)
and the model (make model).

The N photos are synthetic rows in groups of 8 around random centres (made in SQL), with
quality figures, stored under the service's model version so nothing is re-embedded: as many
values as the service's embeddings have, each view (two of 1024 with the low-passed view,
then the detail) of unit length, the views independent and the detail a sharp photo's (0.1),
so no synthetic photo reads as blurred. The K new
photos are real fixture photos uploaded through the API.

Two modes per size: `incremental` (the default config: the worker holds the pet's clustering
after its first job, clustering.cache_mib) and `full` (clustering.cache_mib = 0: every job
reads every vector and re-clusters the pet, O(N^2)). The pet's first job (nothing held yet) is
reported too. Peak memory is the serve process's peak resident set during the measured job
(reset before it through /proc/PID/clear_refs).
"""
import os, re, socket, subprocess, sys, tempfile, time, urllib.request, uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
BIN = os.environ.get("BIN", "target/release/media-clustering")
args = sys.argv[1:]
modes = args[args.index("--modes") + 1].split(",") if "--modes" in args else ["incremental", "full"]
if "--modes" in args:
    del args[args.index("--modes"):args.index("--modes") + 2]
adds = [int(a) for a in args[args.index("--add") + 1:]] if "--add" in args else [1, 10]
sizes = [int(a) for a in (args[:args.index("--add")] if "--add" in args else args)] or [1000, 10000]
PHOTOS = sorted(os.path.join("tests/fixtures/photos", f) for f in os.listdir("tests/fixtures/photos")
                if f.endswith((".png", ".jpg")))


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def psql(db, sql):
    r = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-X", "-q", "-A", "-t",
                        "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, capture_output=True, text=True)
    return r.stdout.strip()


SEED = """
CREATE TEMP TABLE centres AS
  SELECT g AS cid, ARRAY(SELECT (random() - 0.5 + 0 * g)::real FROM generate_series(1, {dim})) AS v
  FROM generate_series(0, {groups} - 1) g;
CREATE TEMP TABLE raw AS
  SELECT gen_random_uuid() AS id, i,
         ARRAY(SELECT (c.v[k] + (random() - 0.5) * 0.12)::real FROM generate_series(1, {dim}) k) AS v
  FROM generate_series(0, {n} - 1) i JOIN centres c ON c.cid = i % {groups};
-- Each view's norm: values 1..{view} and {view}+1..{low_end} (a detail of 0.1, a sharp photo's,
-- follows the views).
CREATE TEMP TABLE normed AS
  SELECT id, i, v,
         sqrt((SELECT sum(v[k] * v[k]) FROM generate_series(1, {view}) k)) AS n1,
         sqrt((SELECT coalesce(sum(v[k] * v[k]), 1) FROM generate_series({view} + 1, {low_end}) k)) AS n2
  FROM raw;
INSERT INTO images (id, pet_id, sha256, content_type, byte_size, width, height, storage_key, created_at)
  SELECT id, 'library', md5(id::text) || md5(i::text), 'image/jpeg', 100000, 640, 480,
         'images/' || id || '.jpg', now() - interval '1 day' + i * interval '1 millisecond'
  FROM raw;
INSERT INTO image_embeddings (image_id, model_version, vector, sharpness, noise, exposure, pixels)
  SELECT id, '{model}',
         ARRAY(SELECT (CASE WHEN k <= {view} THEN v[k] / n1 WHEN k <= {low_end} THEN v[k] / n2 ELSE 0.1 END)::real
               FROM generate_series(1, {dim}) k),
         10 + random() * 10, 2 + random() * 3, 0.5 + random() * 0.5, 307200
  FROM normed;
"""


def peak_rss_mib(pid, field="VmHWM"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


INTERNAL = "bench-internal-token-0123456789abcdef"
# Where a job's time goes: seconds summed per Postgres operation and per actor kind.
PARTS = [("media_cluster_postgres_write_seconds_sum", "operation", o) for o in ("load_pet", "store_embedding", "commit_clusters")] + \
        [("media_cluster_actor_handling_seconds_sum", "actor", a) for a in ("embedder", "clusterer", "hero_selector")]


def parts(base):
    req = urllib.request.Request(base + "/internal/metrics", headers={"Authorization": "Bearer " + INTERNAL})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    out = {}
    for name, label, value in PARTS:
        m = re.search(rf'^{name}\{{[^}}]*{label}="{value}"[^}}]*\}} (\S+)$', text, re.M)
        out[value] = float(m.group(1)) if m else 0.0
    return out


def reset_peak(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def finished_job_seconds(db):
    return float(psql(db, "SELECT extract(epoch FROM finished_at - started_at) FROM jobs "
                          "WHERE pet_id = 'library' AND status = 'succeeded' ORDER BY finished_at DESC LIMIT 1"))


def run(n, k, tmp, mode):
    db = "bench_lib_" + uuid.uuid4().hex[:10]
    psql("postgres", f"CREATE DATABASE {db}")
    port = free_port()
    env = dict(os.environ,
               DATABASE_URL=f"postgres://postgres:postgres@127.0.0.1:5432/{db}", REDIS_URL="redis://127.0.0.1:6379/0",
               MEDIA_CLUSTERING__REDIS__STREAM=f"bench:{db}:jobs", MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM=f"bench:{db}:dl",
               MEDIA_CLUSTERING__STORAGE__URL=f"file://{tmp}/{db}", MEDIA_CLUSTERING__SERVER__BIND=f"127.0.0.1:{port}",
               MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH=os.path.join(ROOT, "models/open-nsfw-int8.onnx"),
               MEDIA_CLUSTERING__ACTORS__JOB_TIMEOUT_MS="3600000", LOG_LEVEL="warn", TELEMETRY_ENABLED="false",
               INTERNAL_METRICS_TOKEN=INTERNAL)
    if mode == "full":
        env["MEDIA_CLUSTERING__CLUSTERING__CACHE_MIB"] = "0"
    subprocess.run([BIN, "migrate"], env=env, check=True, capture_output=True)
    serve = subprocess.Popen([BIN, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1); break
            except Exception:
                time.sleep(0.1)
        # One real photo first, for the model version (and a warm process).
        subprocess.run([BIN, "upload", "--server", base, "--pet", "warm", PHOTOS[0]], env=env, check=True, capture_output=True)
        model, dim = psql(db, "SELECT model_version, array_length(vector, 1) FROM image_embeddings LIMIT 1").split("|")
        # A model version ending in `-lp<sigma>[x<size>]` embeds two views and the photo's detail.
        two = re.search(r"-lp[0-9.]+(x[0-9]+)?$", model)
        view = (int(dim) - 1) // 2 if two else int(dim)
        t0 = time.monotonic()
        psql(db, SEED.format(n=n, groups=max(1, n // 8), model=model, dim=int(dim), view=view,
                             low_end=2 * view if two else int(dim)))
        seeded = time.monotonic() - t0
        # The library's first clustering, so the measured job is a job on a clustered pet.
        subprocess.run([BIN, "upload", "--server", base, "--pet", "library", "--timeout", "3600", PHOTOS[1]],
                       env=env, check=True, capture_output=True)
        first = finished_job_seconds(db)
        rows_before = int(psql(db, "SELECT count(*) FROM cluster_members"))
        held_rss = peak_rss_mib(serve.pid, "VmRSS")
        reset_peak(serve.pid)
        before = parts(base)
        new = PHOTOS[2:2 + k]
        subprocess.run([BIN, "upload", "--server", base, "--pet", "library", "--batch", str(k), "--timeout", "3600", *new],
                       env=env, check=True, capture_output=True)
        job = finished_job_seconds(db)
        after = parts(base)
        spent = {k: after[k] - before[k] for k in after}
        rows_after = int(psql(db, "SELECT count(*) FROM cluster_members"))
        return first, job, peak_rss_mib(serve.pid), seeded, rows_after - rows_before, spent, held_rss
    finally:
        serve.terminate(); serve.wait(timeout=120)
        psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        subprocess.run(["redis-cli", "DEL", f"bench:{db}:jobs", f"bench:{db}:dl"], capture_output=True)


def main():
    tmp = tempfile.mkdtemp(prefix="bench-lib-")
    print(f"binary {BIN}")
    print(f"{'photos in the pet':>18} {'added':>6} {'mode':>12} {'job (start to commit)':>22} {'peak RSS':>10} "
          f"{'member rows written':>20} {'first job':>10}")
    for n in sizes:
        for k in adds:
            for mode in modes:
                first, job, rss, seeded, rows, spent, held = run(n, k, tmp, mode)
                print(f"{n:>18} {k:>6} {mode:>12} {job:>20.3f} s {rss:>7.0f} MiB {rows:>20} {first:>8.2f} s"
                      f"   (seeded in {seeded:.0f} s; RSS before the job {held:.0f} MiB)", flush=True)
                print(" " * 20 + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in spent.items()), flush=True)


if __name__ == "__main__":
    main()
