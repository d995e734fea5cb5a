#!/usr/bin/env python3
"""End-to-end load benchmark of media-clustering (scripts/bench_e2e.sh runs it; see BENCHMARKS.md).

Each run starts `media-clustering serve` on the local Redis and Postgres with a fresh database,
fresh stream names and a fresh storage folder, warms it up with one photo, then uploads photos
for several pets and waits until every job has finished. Reported per run:

- photos/s: photos uploaded / (last job finished - first upload sent);
- upload-to-clusters latency p50/p95/p99: a job's `finished_at` (its clusters are committed)
  minus the moment its upload was sent (one clock: client and database run on this machine);
- per-actor mailbox wait and handling quantiles, from the service's own histograms
  (differences of two scrapes, interpolated within buckets like PromQL's histogram_quantile);
- CPU seconds per thread group (threads grouped by name) and in all;
- peak resident memory (VmHWM).

Workloads: closed loop (one uploader per pet, each request sent as soon as the previous one
was accepted) and open loop (requests at a fixed rate whatever the answers, round-robin over
the pets). The closed loop is repeated for each `--embedders` value. The CPU bound comes from
`media-clustering bench cpu-bound` with the same configuration, so end-to-end photos/s can be
given as a fraction of it. Distinct photos per pet are made by adding a comment (JPEG COM
segment, PNG tEXt chunk) to the fixture photos: same pixels and decoding cost, new bytes.
"""
import argparse
import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import psycopg

SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
INTERNAL = "bench-internal-token-0123456789abcdef"
ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres:postgres@127.0.0.1:5432/postgres")


def log(*a):
    print("bench_e2e:", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def token(scope="media:read media:write", sub="bench"):
    b = lambda d: base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).rstrip(b"=")
    head = b({"alg": "HS256", "typ": "JWT"})
    body = b({"sub": sub, "exp": int(time.time()) + 6 * 3600, "scope": scope})
    sig = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), head + b"." + body, hashlib.sha256).digest()).rstrip(b"=")
    return (head + b"." + body + b"." + sig).decode()


# ------------------------------------------------------------------------- photos


def variant(data: bytes, tag: str) -> bytes:
    """The same image with a comment added, so its bytes (and sha256) differ."""
    if data.startswith(b"\xff\xd8"):
        payload = tag.encode()
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        # After IHDR (8-byte signature + 25-byte IHDR chunk).
        body = b"Comment\x00" + tag.encode()
        chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
        return data[:33] + chunk + data[33:]
    raise ValueError("only JPEG and PNG photos can be varied")


def load_photos(folder: Path):
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no photos in {folder}")
    return [(p.name, p.read_bytes()) for p in files]


def multipart(files):
    bnd = uuid.uuid4().hex
    parts = [
        f'--{bnd}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{bnd}--\r\n".encode(), f"multipart/form-data; boundary={bnd}"


# ------------------------------------------------------------------------ service


class Service:
    def __init__(self, args, env_overrides, name):
        self.args = args
        self.name = name
        self.db = f"bench_{uuid.uuid4().hex[:10]}"
        self.ns = f"bench:{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
        with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.db}"')
        self.dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + self.db
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "APP_ENV": "development",
            "DATABASE_URL": self.dsn,
            "REDIS_URL": args.redis_url,
            "AUTH_JWT_SECRET": SECRET,
            "INTERNAL_METRICS_TOKEN": INTERNAL,
            "TELEMETRY_ENABLED": "true" if args.telemetry else "false",
            "LOG_LEVEL": "info",
            "MEDIA_CLUSTERING__SERVER__BIND": f"127.0.0.1:{self.port}",
            "MEDIA_CLUSTERING__REDIS__STREAM": f"{self.ns}:jobs",
            "MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM": f"{self.ns}:dl",
            "MEDIA_CLUSTERING__STORAGE__URL": f"file://{self.dir}/media",
            "MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH": str(args.model),
            "MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND": "0",
        }
        for k in ("ORT_DYLIB_PATH",):
            if os.environ.get(k):
                self.env[k] = os.environ[k]
        self.env.update(env_overrides)
        self.proc = None

    def cli(self, *argv):
        return subprocess.run([self.args.bin, *argv], env=self.env, capture_output=True, text=True)

    def start(self):
        r = self.cli("migrate")
        if r.returncode != 0:
            raise SystemExit(f"migrate failed: {r.stderr[-500:]}")
        self.log = open(self.dir / "serve.log", "w")
        self.proc = subprocess.Popen([self.args.bin, "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited: {(self.dir / 'serve.log').read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise SystemExit("the service did not become ready within 120 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        keys = subprocess.run(["redis-cli", "-u", self.args.redis_url, "--scan", "--pattern", f"{self.ns}:*"],
                              capture_output=True, text=True).stdout.split()
        if keys:
            subprocess.run(["redis-cli", "-u", self.args.redis_url, "DEL", *keys], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def post(self, pet, files, tok):
        body, ctype = multipart(files)
        req = urllib.request.Request(f"{self.base}/v1/pets/{pet}/images", data=body, method="POST",
                                     headers={"Content-Type": ctype, "Authorization": "Bearer " + tok})
        t = time.time()
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read()), t
        except urllib.error.HTTPError as e:
            return e.code, e.read()[:300], t

    def scrape(self):
        req = urllib.request.Request(self.base + "/internal/metrics", headers={"Authorization": "Bearer " + INTERNAL})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()

    def thread_cpu(self):
        """CPU seconds per thread group: thread names with trailing digits and separators cut."""
        out = {}
        base = Path(f"/proc/{self.proc.pid}/task")
        for t in base.iterdir():
            try:
                comm = (t / "comm").read_text().strip()
                stat = (t / "stat").read_text()
            except OSError:
                continue
            f = stat.rsplit(")", 1)[1].split()
            secs = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
            group = re.sub(r"[-_ :#|]*\d+$", "", comm) or comm
            out[group] = out.get(group, 0.0) + secs
        return out

    def vmhwm_mib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def wait_jobs(dsn, job_ids, timeout):
    """Polls Postgres until every job has finished; returns {job_id: (status, finished_epoch)}."""
    deadline = time.time() + timeout
    with psycopg.connect(dsn, autocommit=True) as c:
        while True:
            rows = c.execute(
                "SELECT id::text, status, extract(epoch FROM finished_at) FROM jobs WHERE id = ANY(%s::uuid[])",
                (list(job_ids),)).fetchall()
            done = {r[0]: (r[1], float(r[2]) if r[2] is not None else None) for r in rows
                    if r[1] in ("succeeded", "failed", "dead_lettered")}
            if len(done) == len(job_ids):
                return done
            if time.time() > deadline:
                raise SystemExit(f"only {len(done)}/{len(job_ids)} jobs finished within {timeout} s")
            time.sleep(0.1)


# ------------------------------------------------------------------------ metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN|\+Inf)')


def histograms(text, name):
    """{labels-without-le: [(le, cumulative count)]} for histogram `name`."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != name + "_bucket":
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        le = labels.pop("le")
        key = tuple(sorted(labels.items()))
        out.setdefault(key, []).append((float("inf") if le == "+Inf" else float(le), float(m.group(3))))
    return {k: sorted(v) for k, v in out.items()}


def delta(after, before):
    out = {}
    for k, buckets in after.items():
        prev = dict(before.get(k, []))
        out[k] = [(le, c - prev.get(le, 0.0)) for le, c in buckets]
    return out


def quantile(buckets, q):
    """PromQL's histogram_quantile over cumulative buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def actor_table(before, after):
    rows = {}
    for metric, col in (("media_cluster_actor_mailbox_wait_seconds", "wait"),
                        ("media_cluster_actor_handling_seconds", "handling")):
        d = delta(histograms(after, metric), histograms(before, metric))
        for key, buckets in d.items():
            actor = dict(key).get("actor")
            n = buckets[-1][1] if buckets else 0
            if not actor or n <= 0:
                continue
            r = rows.setdefault(actor, {})
            r[col] = {"count": n, "p50": quantile(buckets, 0.5), "p95": quantile(buckets, 0.95), "p99": quantile(buckets, 0.99)}
    return rows


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[i]


# ---------------------------------------------------------------------- workloads


def plan(photos, pets, copies, batch, run_tag):
    """Per pet, the list of requests (each a list of (name, bytes))."""
    out = {}
    for p in range(pets):
        pet = f"bench-{run_tag}-{p}"
        files = []
        for c in range(copies):
            for name, data in photos:
                files.append((name, variant(data, f"{pet}/{c}/{name}")))
        out[pet] = [files[i:i + batch] for i in range(0, len(files), batch)]
    return out


def warm_up(svc, photos, tok):
    s, body, _ = svc.post("bench-warmup", [photos[0]], tok)
    if s != 202:
        raise SystemExit(f"warm-up upload answered {s}: {body}")
    wait_jobs(svc.dsn, [body["job_id"]], 300)


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / tck, sum(f[:8]) / tck


def peer_cpu():
    """CPU seconds so far of the processes that share the machine with the service: Postgres,
    Redis and this benchmark (its uploaders and pollers)."""
    out = {"postgres": 0.0, "redis": 0.0}
    tck = os.sysconf("SC_CLK_TCK")
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat.rsplit(")", 1)[1].split()
        secs = (int(f[11]) + int(f[12])) / tck
        if comm.startswith("postgres") or comm.startswith("postmaster"):
            out["postgres"] += secs
        elif comm.startswith("redis-server"):
            out["redis"] += secs
    t = os.times()
    out["benchmark client"] = t.user + t.system
    return out


def measure(svc, run, tok):
    """Runs `run(tok) -> [(job_id, t_sent, photos)]` between two scrapes and CPU readings."""
    before = svc.scrape()
    cpu0 = svc.thread_cpu()
    peers0, machine0 = peer_cpu(), machine_cpu()
    t0 = time.time()
    sent = run(tok)
    done = wait_jobs(svc.dsn, [j for j, _, _ in sent], 1800)
    t_end = max(f for _, f in done.values() if f is not None)
    first = min(t for _, t, _ in sent)
    cpu1 = svc.thread_cpu()
    peers1, machine1 = peer_cpu(), machine_cpu()
    after = svc.scrape()
    photos = sum(n for _, _, n in sent)
    lat = [done[j][1] - t for j, t, _ in sent if done[j][1] is not None]
    statuses = {}
    for s, _ in done.values():
        statuses[s] = statuses.get(s, 0) + 1
    cpu = {k: round(cpu1.get(k, 0) - cpu0.get(k, 0), 2) for k in cpu1}
    cpu = {k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0.005}
    versions = None
    with psycopg.connect(svc.dsn, autocommit=True) as c:
        versions = c.execute("SELECT count(*) FROM cluster_versions").fetchone()[0]
    return {
        "photos": photos,
        "requests": len(sent),
        "jobs": statuses,
        "cluster_versions": versions,
        "elapsed_s": round(t_end - first, 3),
        "wall_s": round(time.time() - t0, 3),
        "photos_per_s": round(photos / (t_end - first), 2),
        "latency_s": {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "p99": pct(lat, 0.99)},
        "actors": actor_table(before, after),
        "cpu_s": cpu,
        "cpu_total_s": round(sum(cpu.values()), 2),
        "peer_cpu_s": {k: round(peers1[k] - peers0[k], 2) for k in peers1},
        "machine_busy": round((machine1[0] - machine0[0]) / max(1e-9, machine1[1] - machine0[1]), 3),
        "peak_rss_mib": round(svc.vmhwm_mib(), 1),
    }


def closed_loop(svc, requests):
    def run(tok):
        sent, lock = [], threading.Lock()

        def uploader(pet, reqs):
            for files in reqs:
                s, body, t = svc.post(pet, files, tok)
                if s != 202:
                    raise SystemExit(f"upload for {pet} answered {s}: {body}")
                with lock:
                    sent.append((body["job_id"], t, len(files)))

        threads = [threading.Thread(target=uploader, args=(pet, reqs)) for pet, reqs in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sent
    return run


def open_loop(svc, requests, rate, batch):
    """Requests of `batch` photos at `rate` photos/s, round-robin over the pets."""
    queue = []
    per_pet = {pet: list(reqs) for pet, reqs in requests.items()}
    while any(per_pet.values()):
        for pet in per_pet:
            if per_pet[pet]:
                queue.append((pet, per_pet[pet].pop(0)))

    def run(tok):
        sent, lock, late = [], threading.Lock(), []
        interval = batch / rate
        start = time.time() + 0.2

        def one(i, pet, files):
            due = start + i * interval
            now = time.time()
            if due > now:
                time.sleep(due - now)
            else:
                late.append(now - due)
            s, body, t = svc.post(pet, files, tok)
            if s != 202:
                raise SystemExit(f"upload for {pet} answered {s}: {body}")
            with lock:
                sent.append((body["job_id"], t, len(files)))

        with concurrent.futures.ThreadPoolExecutor(max_workers=64) as ex:
            list(ex.map(lambda a: one(*a), [(i, pet, files) for i, (pet, files) in enumerate(queue)]))
        if late and max(late) > interval:
            log(f"offered load slipped: a request started {max(late):.2f} s late")
        return sent
    return run


def cpu_bound(args, env, seconds):
    svc_env = dict(os.environ)
    svc_env.update(env)
    svc_env.update({"APP_ENV": "development", "AUTH_JWT_SECRET": SECRET, "INTERNAL_METRICS_TOKEN": INTERNAL,
                    "TELEMETRY_ENABLED": "false", "LOG_LEVEL": "warn",
                    "MEDIA_CLUSTERING__EMBEDDER__MODEL_PATH": str(args.model)})
    r = subprocess.run([args.bin, "bench", "cpu-bound", "--photos", str(args.photos), "--seconds", str(seconds)],
                       env=svc_env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench cpu-bound failed: {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------- main


def reference_loop(args):
    script = Path(__file__).with_name("reference_loop.py")
    r = subprocess.run([sys.executable, str(script), "--model", str(args.reference_model), "--photos", str(args.photos),
                        "--pets", str(args.pets), "--copies", str(args.copies),
                        "--threads", str(args.reference_threads)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"reference_loop.py failed: {r.stderr[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def env_pairs(items):
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        out[k] = v
    return out


def fmt_q(d):
    return "/".join("-" if d.get(k) is None else f"{d[k] * 1e3:.1f}" for k in ("p50", "p95", "p99"))


def report_run(label, r):
    lat = r["latency_s"]
    print(f"\n### {label}\n")
    print(f"- photos: {r['photos']} in {r['requests']} requests; jobs {r['jobs']}; cluster versions {r['cluster_versions']}")
    print(f"- **{r['photos_per_s']} photos/s** (first upload to last job finished: {r['elapsed_s']} s)")
    print("- upload-to-clusters latency p50/p95/p99: " + "/".join(f"{lat[k]:.2f}" if lat[k] is not None else "-" for k in ("p50", "p95", "p99")) + " s")
    print(f"- peak RSS {r['peak_rss_mib']} MiB; CPU {r['cpu_total_s']} s: " + ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items()))
    print(f"- the machine was {r['machine_busy'] * 100:.0f} % busy meanwhile; CPU s of its other processes: "
          + ", ".join(f"{k} {v}" for k, v in r["peer_cpu_s"].items()))
    print("\n| actor | messages | mailbox wait p50/p95/p99 (ms) | handling p50/p95/p99 (ms) |\n|---|---:|---|---|")
    for actor, row in sorted(r["actors"].items()):
        n = int(row.get("handling", row.get("wait", {})).get("count", 0))
        print(f"| {actor} | {n} | {fmt_q(row.get('wait', {}))} | {fmt_q(row.get('handling', {}))} |")


def plot(path, sweep, open_runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if sweep:
        xs = [s["embedders"] for s in sweep]
        a.plot(xs, [s["result"]["photos_per_s"] for s in sweep], "o-", label="end to end")
        a.plot(xs, [s["cpu_bound"]["photos_per_second"] for s in sweep], "s--", label="CPU bound")
        a.set_xlabel("actors.embedders")
        a.set_ylabel("photos/s")
        a.set_xticks(xs)
        a.set_ylim(bottom=0)
        a.legend()
        a.set_title("Throughput (closed loop)")
    if open_runs:
        xs = [o["rate"] for o in open_runs]
        for q, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
            b.plot(xs, [o["result"]["latency_s"][q] for o in open_runs], style, label=q)
        b.set_xlabel("offered photos/s")
        b.set_ylabel("upload-to-clusters latency (s)")
        b.set_ylim(bottom=0)
        b.legend()
        b.set_title("Latency (open loop)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot written to {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/media-clustering")
    ap.add_argument("--model", default="models/open-nsfw-int8.onnx", type=Path)
    ap.add_argument("--reference-model", default="models/open-nsfw.onnx", type=Path,
                    help="the plain loop's model (the pinned one, whatever --model the service gets)")
    ap.add_argument("--photos", default="tests/fixtures/photos", type=Path)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--pets", type=int, default=4)
    ap.add_argument("--copies", type=int, default=1, help="distinct copies of each photo per pet (closed loop)")
    ap.add_argument("--batch", type=int, default=16, help="photos per request (closed loop)")
    ap.add_argument("--embedders", default="", help="comma list for the throughput sweep, e.g. 1,2,4 (empty: the config's)")
    ap.add_argument("--rates", default="", help="open-loop offered photos/s, comma list (empty: no open loop)")
    ap.add_argument("--open-batch", type=int, default=4)
    ap.add_argument("--open-seconds", type=float, default=20.0)
    ap.add_argument("--cpu-seconds", type=float, default=10.0)
    ap.add_argument("--env", action="append", help="K=V for the service (repeatable)")
    ap.add_argument("--telemetry", action="store_true", help="leave TELEMETRY_ENABLED on")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also run scripts/reference_loop.py (the plain Python loop) on the same photos")
    ap.add_argument("--reference-threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    args.model = args.model.resolve()
    args.reference_model = args.reference_model.resolve()
    args.photos = args.photos.resolve()
    env = env_pairs(args.env)
    photos = load_photos(args.photos)
    tok = token()
    out = {"config": env, "pets": args.pets, "photos_per_pet": len(photos) * args.copies, "sweep": [], "open": []}
    print(f"# End-to-end benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f})\n\nbinary {args.bin}; service env {env or '{}'}")

    sweep = [int(x) for x in args.embedders.split(",") if x] or [None]
    for e in sweep:
        run_env = dict(env)
        if e is not None:
            run_env["MEDIA_CLUSTERING__ACTORS__EMBEDDERS"] = str(e)
        bound = cpu_bound(args, run_env, args.cpu_seconds)
        label = f"closed loop, {args.pets} pets x {len(photos) * args.copies} photos, batches of {args.batch}" + (
            f", actors.embedders={e}" if e is not None else "")
        log(label)
        svc = Service(args, run_env, "closed")
        try:
            svc.start()
            warm_up(svc, photos, tok)
            tag = uuid.uuid4().hex[:6]
            r = measure(svc, closed_loop(svc, plan(photos, args.pets, args.copies, args.batch, tag)), tok)
        finally:
            svc.stop()
        r["fraction_of_cpu_bound"] = round(r["photos_per_s"] / bound["photos_per_second"], 3)
        report_run(label, r)
        print(f"- CPU bound (`bench cpu-bound`, {bound['embedders']} x {bound['intra_op_threads']} threads, "
              f"{bound['backend']}): {bound['photos_per_second']:.1f} photos/s -> end to end is "
              f"**{r['fraction_of_cpu_bound'] * 100:.0f} %** of it")
        out["sweep"].append({"embedders": e if e is not None else bound["embedders"], "cpu_bound": bound, "result": r})

    if args.reference:
        ref = reference_loop(args)
        out["reference"] = ref
        print(f"\n## Reference: the plain Python loop (scripts/reference_loop.py)\n\n"
              f"- Pillow + ONNX Runtime {ref['onnxruntime']} ({ref['threads']} threads) + scikit-learn "
              f"DBSCAN, {ref['photos']} photos: **{ref['photos_per_second']:.1f} photos/s**, "
              f"{ref['cpu_seconds']} CPU s, peak RSS {ref['peak_rss_mib']} MiB")
        for s in out["sweep"]:
            ratio = s["result"]["photos_per_s"] / ref["photos_per_second"]
            s["result"]["ratio_to_reference"] = round(ratio, 2)
            print(f"- the service (actors.embedders={s['embedders']}): "
                  f"{s['result']['photos_per_s']:.1f} photos/s = **{ratio:.2f}x** the loop")

    for rate in [float(x) for x in args.rates.split(",") if x]:
        n = max(1, int(rate * args.open_seconds))
        per_pet = -(-n // args.pets)
        copies = -(-per_pet // len(photos))
        svc = Service(args, env, "open")
        label = f"open loop, {rate:g} photos/s offered in requests of {args.open_batch}, {args.open_seconds:g} s"
        log(label)
        try:
            svc.start()
            warm_up(svc, photos, tok)
            reqs = plan(photos, args.pets, copies, args.open_batch, uuid.uuid4().hex[:6])
            budget = -(-n // args.open_batch)
            trimmed, taken = {}, 0
            while taken < budget:
                for pet in reqs:
                    if taken < budget and reqs[pet]:
                        trimmed.setdefault(pet, []).append(reqs[pet].pop(0))
                        taken += 1
            r = measure(svc, open_loop(svc, trimmed, rate, args.open_batch), tok)
        finally:
            svc.stop()
        report_run(label, r)
        out["open"].append({"rate": rate, "result": r})

    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(args.plot, out["sweep"], out["open"])


if __name__ == "__main__":
    main()
