#!/usr/bin/env python3
"""Benchmark: this project's clustering (linfa DBSCAN + GramSearch) vs scikit-learn's DBSCAN.

Generates deterministic, embedding-like unit vectors (tight groups of 3-30 "photos" around
random centres, near misses and unrelated noise points), writes each data set once as a float32
.npy file in a temporary directory, times scikit-learn's DBSCAN on it, runs the Rust bench
binary (actors/examples/bench_cluster.rs, release build) on the same file, checks that the two
partitions agree, and prints a Markdown table.

Usage (needs numpy and scikit-learn, e.g. in /tmp/bench-venv; see scripts/bench.sh):
    python scripts/bench_cluster.py [--sizes 1000,5000,20000] [--repeat 3] ...
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(n, dim, seed, eps, noise_frac, shared):
    """n L2-normalised float32 vectors, shuffled.

    Unrelated vectors share a common direction with weight `shared`, so their cosine
    similarity is about `shared` (CNN embeddings are not orthogonal). Groups of 3-30 sit
    around a centre with a per-group spread chosen so that within-group cosine distances are
    about 0.1-0.6 x eps (all below eps). Of the `noise_frac` noise points, half are unrelated
    vectors and half are near misses: around a group centre with a spread of 0.5-2 x eps, so
    some join a group (mostly as border points), some stay noise, and some pairs of points lie
    close to the eps threshold.
    """
    rng = np.random.default_rng(seed)
    common = unit_rows(rng.standard_normal(dim))

    def random_units(k):
        g = unit_rows(rng.standard_normal((k, dim)))
        return unit_rows(np.sqrt(shared) * common + np.sqrt(1.0 - shared) * g)

    def around(centre, k, cos_dist):
        # For x = c + s z (z standard normal), two such points have cosine distance
        # ~ s^2 d / (1 + s^2 d); a point and c have about half of that.
        sigma = np.sqrt(cos_dist / (1.0 - cos_dist) / dim)
        return unit_rows(centre + sigma * rng.standard_normal((k, dim)))

    n_noise = int(round(noise_frac * n))
    n_grouped = n - n_noise
    parts, centres, left = [], [], n_grouped
    while left > 0:
        size = min(int(rng.integers(3, 31)), left)
        centre = random_units(1)[0]
        centres.append(centre)
        parts.append(around(centre, size, rng.uniform(0.1, 0.6) * eps))
        left -= size
    n_near = n_noise // 2
    for _ in range(n_near):
        centre = centres[int(rng.integers(len(centres)))]
        parts.append(around(centre, 1, rng.uniform(0.5, 2.0) * eps))
    parts.append(random_units(n_noise - n_near))
    x = np.concatenate(parts).astype(np.float32)
    x = unit_rows(x).astype(np.float32)
    return np.ascontiguousarray(x[rng.permutation(n)])


def canonical(labels):
    """Labels renumbered by first occurrence, noise (-1) as singletons: a partition's identity."""
    out, seen = np.empty(len(labels), dtype=np.int64), {}
    for i, l in enumerate(labels):
        key = ("noise", i) if l < 0 else l
        out[i] = seen.setdefault(key, len(seen))
    return out


def build_rust(no_build):
    if no_build:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        return str(target / "release" / "examples" / "bench_cluster")
    cmd = ["cargo", "build", "--release", "-p", "media-clustering-actors",
           "--example", "bench_cluster", "--message-format=json-render-diagnostics"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "bench_cluster":
            return msg["executable"]
    sys.exit("bench_cluster: could not find the built example")


def run_rust(binary, path, eps, min_points, repeat, algos, labels_out=None):
    cmd = [binary, str(path), "--eps", str(eps), "--min-points", str(min_points),
           "--repeat", str(repeat), "--algos", ",".join(algos)]
    if labels_out:
        cmd += ["--labels-out", str(labels_out)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out)


def time_sklearn(x, eps_l2, min_points):
    """One timed DBSCAN fit with scikit-learn's defaults (algorithm="auto", n_jobs=None)."""
    from sklearn.cluster import DBSCAN

    start = time.perf_counter()
    model = DBSCAN(eps=eps_l2, min_samples=min_points, metric="euclidean").fit(x)
    return time.perf_counter() - start, model.labels_


def sklearn_counts_the_point_itself():
    """Two points 0.5 apart, eps 0.6: each has two neighbours only if it counts itself."""
    from sklearn.cluster import DBSCAN

    x = np.array([[0.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    two = DBSCAN(eps=0.6, min_samples=2).fit(x).labels_
    three = DBSCAN(eps=0.6, min_samples=3).fit(x).labels_
    return bool((two >= 0).all() and (three < 0).all())


def environment():
    import sklearn
    from threadpoolctl import threadpool_info

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rustc = subprocess.run(["rustc", "--version"], stdout=subprocess.PIPE, text=True).stdout
    pools = [
        f"{p['internal_api']} {p.get('version') or ''} ({p.get('architecture') or p['user_api']}): "
        f"{p['num_threads']} threads"
        for p in threadpool_info()
    ]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "rustc": rustc.strip(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "thread pools": pools,
        "sklearn min_samples counts the point itself": sklearn_counts_the_point_itself(),
    }


def fmt(seconds):
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--eps", type=float, default=0.18, help="cosine distance (config default)")
    ap.add_argument("--min-points", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.15, help="fraction of noise points")
    ap.add_argument("--shared", type=float, default=0.3,
                    help="cosine similarity of unrelated vectors")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (median reported)")
    ap.add_argument("--baseline-repeat", type=int, default=3,
                    help="runs for the LinearSearch / KdTree baselines")
    ap.add_argument("--linear-max", type=int, default=5000,
                    help="largest size to time linfa's LinearSearch at")
    ap.add_argument("--kdtree-max", type=int, default=5000,
                    help="largest size to time linfa's KdTree at")
    ap.add_argument("--workdir", help="where the .npy files go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-build", action="store_true", help="do not rebuild the Rust example")
    ap.add_argument("--json-out", help="also write all measurements here")
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes.split(",") if s]
    eps_l2 = float(np.sqrt(np.float32(2.0) * np.float32(args.eps), dtype=np.float32))
    binary = build_rust(args.no_build)
    env = environment()
    print("# environment", file=sys.stderr)
    for k, v in env.items():
        print(f"#   {k}: {v}", file=sys.stderr)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sizes:
            x = generate(n, args.dim, args.seed + n, args.eps, args.noise, args.shared)
            path = workdir / f"embeddings_{n}x{args.dim}.npy"
            np.save(path, x)
            print(f"# n={n}: {path}", file=sys.stderr)

            # Alternate the two sides run by run, so that a change in machine load hits both.
            load_before = os.getloadavg()[0]
            labels_path = workdir / f"labels_{n}.txt"
            sk_times, ours_times, gram = [], [], None
            for r in range(args.repeat):
                t, sk_labels = time_sklearn(x, eps_l2, args.min_points)
                sk_times.append(t)
                out = run_rust(binary, path, args.eps, args.min_points, 1, ["gram"],
                               labels_path if r == 0 else None)
                gram = out["results"][0]
                ours_times += gram["times_s"]
            rust_labels = np.loadtxt(labels_path, dtype=np.int64).reshape(-1)
            load_after = os.getloadavg()[0]

            baselines = [a for a, limit in (("linear", args.linear_max),
                                            ("kdtree", args.kdtree_max)) if n <= limit]
            base_times = {a: [] for a in baselines}
            base_same = True
            for _ in range(args.baseline_repeat if baselines else 0):
                out = run_rust(binary, path, args.eps, args.min_points, 1,
                               ["gram"] + baselines)
                for res in out["results"][1:]:
                    base_times[res["algo"]] += res["times_s"]
                    base_same &= bool(res["same_partition_as_first"])

            from sklearn.metrics import adjusted_rand_score
            from sklearn.neighbors import NearestNeighbors

            # The neighbour search DBSCAN's default algorithm="auto" picks for this data.
            sk_algorithm = NearestNeighbors(radius=eps_l2).fit(x)._fit_method

            sk_canon, rust_canon = canonical(sk_labels), canonical(rust_labels)
            row = {
                "n": n,
                "dim": args.dim,
                "groups": gram["multi_member_clusters"],
                "singletons": gram["singletons"],
                "sklearn_noise": int((sk_labels < 0).sum()),
                "sklearn_clusters": int(sk_labels.max() + 1),
                "ours_s": statistics.median(ours_times),
                "ours_times": ours_times,
                "sklearn_s": statistics.median(sk_times),
                "sklearn_times": sk_times,
                "linear_s": statistics.median(base_times["linear"]) if "linear" in base_times
                else None,
                "linear_times": base_times.get("linear"),
                "kdtree_s": statistics.median(base_times["kdtree"]) if "kdtree" in base_times
                else None,
                "kdtree_times": base_times.get("kdtree"),
                "baselines_same_partition": base_same,
                "load_avg_1min": [load_before, load_after],
                "sklearn_algorithm": sk_algorithm,
                "ari": adjusted_rand_score(sk_canon, rust_canon),
                "identical_partition": bool((sk_canon == rust_canon).all()),
            }
            row["speedup"] = row["sklearn_s"] / row["ours_s"]
            rows.append(row)
            print(f"# {json.dumps(row)}", file=sys.stderr)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"eps = {args.eps} cosine = {eps_l2:.7f} L2, min_points = min_samples = "
          f"{args.min_points}, {args.dim}-d float32, seed {args.seed}; median of "
          f"{args.repeat} runs, scikit-learn and ours alternating "
          f"({args.baseline_repeat} for LinearSearch/KdTree)\n")
    print("| vectors | groups / singletons | this project (GramSearch) | scikit-learn DBSCAN "
          "| sklearn ÷ ours | linfa LinearSearch | linfa KdTree | partition vs sklearn |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        check = "identical" if r["identical_partition"] else "differs"
        base_ok = "" if r["baselines_same_partition"] else " (baseline partition differs!)"
        print(f"| {r['n']:,} | {r['groups']} / {r['singletons']} | {fmt(r['ours_s'])} "
              f"| {fmt(r['sklearn_s'])} | {r['speedup']:.1f}× | {fmt(r['linear_s'])} "
              f"| {fmt(r['kdtree_s'])} | {check}, ARI {r['ari']:.4f}{base_ok} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
