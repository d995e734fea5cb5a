#!/usr/bin/env python3
"""Embedding benchmark: this project's embedder (tract, Rust release build) against ONNX Runtime.

The ONNX Runtime side runs here; the tract side is target/release/examples/bench_embed
(actors/examples/bench_embed.rs), which this script runs as a subprocess, alternating rounds
of the two backends so that a change in machine load hits both alike. Usually started by
scripts/bench_embed.sh, which builds the example and prepares the venv:

    scripts/bench_embed.sh                       # everything, default settings
    python scripts/bench_embed.py --rust-bin target/release/examples/bench_embed \
        [--rounds 3] [--passes 3] [--decode-runs 5] [--two-core] [--work /tmp/bench-embed]

What is measured (medians; every pass after a warm-up):
  * inference alone, 1 thread: tract (plan built as OnnxEmbedder::load builds it, output node
    "Reshape") and ORT (intra_op_num_threads=1) on the very same input tensors, which the
    Rust side preprocesses with embed::preprocess and dumps;
  * preprocessing alone: embed::preprocess (Rust) and an equivalent Pillow/numpy pipeline;
  * agreement: cosine similarity of the L2-normalised tract and ORT embeddings, per photo;
  * decode + preprocess of 1, 12 and 24 MP JPEGs (quality 90): decode::decode and
    embed::preprocess in Rust, and Pillow full decode and Pillow draft() (reduced-scale
    JPEG decoding) for reference.

ORT can only return graph outputs, so the model is cut at "Reshape:0" (the pooled 1024-d
layer, the same node the project selects) into WORK/open-nsfw-reshape.onnx with
onnx.utils.extract_model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import PIL
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
# The "open-nsfw" preset of src/config.rs.
INPUT_SIZE = 224
RESIZE_TO = 256
MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
PHOTO_EXTS = {".jpg", ".jpeg", ".png", ".webp"}


def log(msg: str) -> None:
    print(f"bench_embed: {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_vnni") if x in have)
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "cpu_flags": flags,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cut_model(src: Path, dst: Path, output: str = "Reshape:0") -> None:
    """A copy of the model whose only graph output is `output` (ORT fetches graph outputs only)."""
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    m = onnx.load(str(src))
    names = [i.name for i in m.graph.input]
    onnx.utils.extract_model(str(src), str(dst), names, [output])
    log(f"wrote {dst} (graph output {output})")


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def l2(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > 0, v / np.where(n > 0, n, 1), v)


def pillow_preprocess(img: Image.Image) -> np.ndarray:
    """Pillow/numpy twin of embed::preprocess: shorter side to 256 (bilinear), centre crop
    224, BGR, mean subtracted, NHWC float32."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    scale = RESIZE_TO / max(min(w, h), 1)
    rw = max(round(w * scale), INPUT_SIZE)
    rh = max(round(h * scale), INPUT_SIZE)
    img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    x0, y0 = (rw - INPUT_SIZE) // 2, (rh - INPUT_SIZE) // 2
    img = img.crop((x0, y0, x0 + INPUT_SIZE, y0 + INPUT_SIZE))
    a = np.asarray(img, dtype=np.float32)[:, :, ::-1] - MEAN_BGR
    return a[None, ...]


def pillow_open(data: bytes, draft_for: int | None = None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if draft_for is not None and img.format == "JPEG":
        w, h = img.size
        scale = draft_for / min(w, h)
        # draft() picks the largest DCT scale (1/2, 1/4, 1/8) that keeps at least this size.
        img.draft("RGB", (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))))
    img.load()
    # Like decode::decode: apply the EXIF orientation (exif_transpose copies, so only if needed).
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return img


def run_rust(rust_bin: str, args: list[str]) -> dict:
    cmd = [rust_bin, *args]
    log("running " + " ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def ort_passes(sess, inputs: np.ndarray, passes: int, warmup: int) -> dict:
    name_in = sess.get_inputs()[0].name
    name_out = sess.get_outputs()[0].name
    for i in range(warmup):
        sess.run([name_out], {name_in: inputs[i % len(inputs)][None]})
    rows, lat, emb = [], [], None
    for p in range(passes):
        out = []
        c0, t0 = time.process_time(), time.perf_counter()
        for x in inputs:
            t = time.perf_counter()
            out.append(sess.run([name_out], {name_in: x[None]})[0][0])
            lat.append((time.perf_counter() - t) * 1e3)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"pass": p, "wall_s": wall, "cpu_s": cpu,
                     "photos_per_s": len(inputs) / wall, "photos_per_cpu_s": len(inputs) / cpu})
        log(f"ort pass {p}: {len(inputs) / wall:.2f} photos/s wall, {len(inputs) / cpu:.2f} photos/cpu-s")
        emb = np.stack(out)
    return {"pass_rows": rows, "latency_ms": lat, "embeddings": l2(emb.astype(np.float64))}


def extras(a, cut: Path, inputs: np.ndarray, work: Path) -> dict:
    batch = 8
    rust = run_rust(a.rust_bin, ["embed", "--model", a.model, "--output", "Reshape", "--photos", a.photos,
                                 "--passes", str(a.passes), "--warmup", str(a.warmup),
                                 "--batch", str(batch), "--profile", "20"])
    sess = session(cut, 1)
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    n = len(inputs)
    batches = [np.stack([inputs[(b * batch + k) % n] for k in range(batch)]) for b in range(-(-n // batch))]
    sess.run([name_out], {name_in: batches[0]})
    rows = []
    for _ in range(a.passes):
        c0, t0 = time.process_time(), time.perf_counter()
        for x in batches:
            sess.run([name_out], {name_in: x})
        done = len(batches) * batch
        rows.append({"photos_per_s": done / (time.perf_counter() - t0),
                     "photos_per_cpu_s": done / (time.process_time() - c0)})
        log(f"ort batch {batch}: {rows[-1]['photos_per_s']:.2f} photos/s")
    # ORT's own profiler: kernel time per operator type (after its graph fusions).
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(work / "ort_profile")
    so.optimized_model_filepath = str(work / "open-nsfw-reshape.ort-optimized.onnx")
    ps = ort.InferenceSession(str(cut), so, providers=["CPUExecutionProvider"])
    for i in range(a.warmup):
        ps.run([name_out], {name_in: inputs[i % n][None]})
    t0 = time.perf_counter()
    count = 20
    for i in range(count):
        ps.run([name_out], {name_in: inputs[i % n][None]})
    total = (time.perf_counter() - t0) * 1e3 / count
    events = json.loads(Path(ps.end_profiling()).read_text())
    by_op: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op.setdefault(e["args"].get("op_name", "?"), []).append(e["dur"] / 1e3)
    runs = count + a.warmup
    ops = sorted(({"op": k, "ms_per_inference": sum(v) / runs, "nodes": len(v) // runs}
                  for k, v in by_op.items()), key=lambda r: -r["ms_per_inference"])
    return {"tract": rust["extras"], "tract_passes": rust["pass_rows"],
            "ort_batch": {"size": batch, "passes": rows},
            "ort_profile": {"inferences": count, "ms_per_inference": total, "ops": ops}}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    return f"{min(xs):.1f}–{max(xs):.1f}" if xs else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rust-bin", default=str(ROOT / "target/release/examples/bench_embed"))
    ap.add_argument("--model", default=str(ROOT / "models/open-nsfw.onnx"))
    ap.add_argument("--photos", default=str(ROOT / "tests/fixtures/photos"))
    ap.add_argument("--work", default="/tmp/bench-embed")
    ap.add_argument("--rounds", type=int, default=3, help="alternating tract/ORT rounds")
    ap.add_argument("--passes", type=int, default=3, help="passes over all photos per round")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up inferences per round")
    ap.add_argument("--decode-runs", type=int, default=5)
    ap.add_argument("--sizes", default="1,12,24", help="megapixels of the decode test JPEGs")
    ap.add_argument("--two-core", action="store_true",
                    help="also measure 2 inference threads (tract) and intra_op=2 (ORT)")
    ap.add_argument("--extras", action="store_true",
                    help="also measure what might help: reused tract state, batch 8 (both "
                         "backends), and a per-operator profile of each backend")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--json", default="", help="write all results here (default WORK/results.json)")
    a = ap.parse_args()

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["loadavg_start"] = loadavg()
    log(f"machine: {info}")
    cut = work / "open-nsfw-reshape.onnx"
    cut_model(Path(a.model), cut)

    # --- embedding throughput: alternate tract and ORT rounds --------------------------------
    sess = session(cut, 1)
    tract_rounds, ort_rounds = [], []
    inputs = None
    for r in range(a.rounds):
        args = ["embed", "--model", a.model, "--output", "Reshape", "--photos", a.photos,
                "--passes", str(a.passes), "--warmup", str(a.warmup), "--threads", "1"]
        if r == 0:
            args += ["--dump", str(work)]
        tract_rounds.append(run_rust(a.rust_bin, args))
        if inputs is None:
            n = len(tract_rounds[0]["photos"])
            inputs = np.fromfile(work / "inputs.f32", dtype="<f4").reshape(n, INPUT_SIZE, INPUT_SIZE, 3)
        ort_rounds.append(ort_passes(sess, inputs, a.passes, a.warmup))
    t0 = tract_rounds[0]
    names = t0["photos"]
    tract_emb = np.fromfile(work / "tract.f32", dtype="<f4").reshape(len(names), -1).astype(np.float64)
    ort_emb = ort_rounds[0]["embeddings"]
    cos = np.sum(l2(tract_emb) * ort_emb, axis=1)
    maxabs = float(np.max(np.abs(tract_emb - ort_emb)))

    # ORT on Pillow-preprocessed inputs: how close is the Python pipeline to embed::preprocess?
    paths = sorted(p for p in Path(a.photos).iterdir() if p.suffix.lower() in PHOTO_EXTS)
    assert [p.name for p in paths] == names, "photo lists differ"
    datas = [p.read_bytes() for p in paths]
    imgs = [pillow_open(d) for d in datas]
    pil_inputs = np.concatenate([pillow_preprocess(i) for i in imgs])
    pil_pre_ms = []
    for _ in range(a.passes):
        for i in imgs:
            t = time.perf_counter()
            pillow_preprocess(i)
            pil_pre_ms.append((time.perf_counter() - t) * 1e3)
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    pil_emb = l2(np.stack([sess.run([name_out], {name_in: x[None]})[0][0] for x in pil_inputs]).astype(np.float64))
    cos_pil = np.sum(l2(tract_emb) * pil_emb, axis=1)
    input_diff = np.abs(pil_inputs - inputs)

    results = {
        "machine": info,
        "tract_rounds": tract_rounds,
        "ort_rounds": [{k: v for k, v in r.items() if k != "embeddings"} for r in ort_rounds],
        "agreement": {
            "cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
            "max_abs_diff": maxabs, "per_photo": dict(zip(names, map(float, cos))),
            "pillow_cos_min": float(cos_pil.min()), "pillow_cos_median": float(np.median(cos_pil)),
            "pillow_input_mean_abs_diff": float(input_diff.mean()),
            "pillow_input_max_abs_diff": float(input_diff.max()),
        },
        "pillow_preprocess_ms_median": med(pil_pre_ms),
    }

    # --- optional: both cores ---------------------------------------------------------------
    if a.two_core:
        results["two_core"] = {
            "tract_2_threads": run_rust(a.rust_bin, ["embed", "--model", a.model, "--output", "Reshape",
                                                     "--photos", a.photos, "--passes", str(a.passes),
                                                     "--warmup", str(a.warmup), "--threads", "2"]),
            "ort_intra_op_2": {k: v for k, v in ort_passes(session(cut, 2), inputs, a.passes, a.warmup).items()
                               if k != "embeddings"},
        }

    # --- optional: reused state, batching, per-operator profiles -------------------------
    if a.extras:
        results["extras"] = extras(a, cut, inputs, work)

    # --- decode + preprocess at 1, 12, 24 MP ------------------------------------------------
    if not a.skip_decode:
        rust_dec = run_rust(a.rust_bin, ["decode", "--sizes", a.sizes, "--runs", str(a.decode_runs),
                                         "--work", str(work)])
        rows = []
        for row in rust_dec["rows"]:
            data = Path(row["file"]).read_bytes()
            res = {"megapixels": row["megapixels"]}
            # Pillow's draft() asked for the same shorter side as the Rust reduced decode.
            for mode, draft in (("full", None), ("draft", row["min_short"])):
                dec, pre = [], []
                for run in range(a.decode_runs + 1):
                    t = time.perf_counter()
                    img = pillow_open(data, draft)
                    d = (time.perf_counter() - t) * 1e3
                    t = time.perf_counter()
                    x = pillow_preprocess(img)
                    p = (time.perf_counter() - t) * 1e3
                    if run > 0:
                        dec.append(d)
                        pre.append(p)
                res[mode] = {"decode_ms": med(dec), "preprocess_ms": med(pre),
                             "decoded_size": list(img.size), "tensor": x}
            # What reduced-scale decoding costs in embedding terms (ORT, same model).
            e = [l2(sess.run([name_out], {name_in: res[m]["tensor"]})[0][0].astype(np.float64))
                 for m in ("full", "draft")]
            res["draft_vs_full_cos"] = float(np.dot(e[0], e[1]))
            for m in ("full", "draft"):
                del res[m]["tensor"]
            rows.append(res)
        results["decode"] = {"rust": rust_dec, "pillow": rows}

    info["loadavg_end"] = loadavg()
    out = Path(a.json) if a.json else work / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")
    print_tables(results)
    return 0


def print_tables(res: dict) -> None:
    m = res["machine"]
    p = print
    p(f"Machine: {m['cpu_model']}, nproc {m['nproc']} ({m['cpu_flags']}), kernel {m['kernel']}; "
      f"onnxruntime {m['onnxruntime']}, tract-onnx {res['tract_rounds'][0]['tract_onnx_version']}, "
      f"Pillow {m['pillow']}, numpy {m['numpy']}; loadavg {m['loadavg_start']} -> {m['loadavg_end']}")
    t_rows = [r for rd in res["tract_rounds"] for r in rd["pass_rows"]]
    o_rows = [r for rd in res["ort_rounds"] for r in rd["pass_rows"]]
    t_ps = [r["photos_per_s"] for r in t_rows]
    o_ps = [r["photos_per_s"] for r in o_rows]
    t_cps = [r["photos_per_cpu_s"] for r in t_rows]
    o_cps = [r["photos_per_cpu_s"] for r in o_rows]
    t_lat = med([rd["inference_ms_median"] for rd in res["tract_rounds"]])
    o_lat = med([x for rd in res["ort_rounds"] for x in rd["latency_ms"]])
    t_pre = med([rd["preprocess_ms_median"] for rd in res["tract_rounds"]])
    t_e2e = med([rd["embed_e2e_ms_median"] for rd in res["tract_rounds"]])
    n = len(res["tract_rounds"][0]["photos"])
    p()
    p(f"Embedding, 1 thread, {n} photos x {len(t_rows)} passes per backend "
      f"({len(res['tract_rounds'])} alternating rounds); inference only, same input tensors:")
    p()
    p("| backend | ms/photo (median) | photos/s (median pass) | pass range | photos/s/core | photos/CPU-s |")
    p("|---|---:|---:|---:|---:|---:|")
    p(f"| tract 0.23.9 (this project) | {t_lat:.1f} | {med(t_ps):.2f} | {spread(t_ps)} | {med(t_ps):.2f} | {med(t_cps):.2f} |")
    p(f"| ONNX Runtime {m['onnxruntime']} (intra_op=1) | {o_lat:.1f} | {med(o_ps):.2f} | {spread(o_ps)} | {med(o_ps):.2f} | {med(o_cps):.2f} |")
    p()
    p(f"tract / ORT time ratio: {med(o_ps) / med(t_ps):.2f}x by wall-clock throughput, "
      f"{t_lat / o_lat:.2f}x by median latency, {med(o_cps) / med(t_cps):.2f}x by CPU time "
      f"(goal: <= 1.2x)")
    p()
    p("| step (per photo, median) | ms |")
    p("|---|---:|")
    p(f"| embed::preprocess (Rust, fixtures) | {t_pre:.2f} |")
    p(f"| Pillow + numpy preprocess (fixtures) | {res['pillow_preprocess_ms_median']:.2f} |")
    p(f"| OnnxEmbedder::embed end to end (preprocess + tract + normalise) | {t_e2e:.1f} |")
    p(f"| decode::decode of the fixtures (first decode, for reference) | "
      f"{med([rd['decode_ms_median'] for rd in res['tract_rounds']]):.2f} |")
    ag = res["agreement"]
    p()
    p(f"Agreement (same inputs): cosine(tract, ORT) min {ag['cos_min']:.6f}, median {ag['cos_median']:.6f}, "
      f"max |diff| {ag['max_abs_diff']:.2e} over {n} photos; "
      f"{sum(v > 0.999 for v in ag['per_photo'].values())}/{n} above 0.999. "
      f"embedder-vs-bench-plan max |diff| "
      f"{max(rd['embedder_vs_plan_max_abs_diff'] for rd in res['tract_rounds']):.2e}.")
    p(f"Pillow preprocessing vs embed::preprocess: input mean |diff| {ag['pillow_input_mean_abs_diff']:.2f}, "
      f"max {ag['pillow_input_max_abs_diff']:.1f} (0-255 scale); cosine(tract, ORT on Pillow inputs) "
      f"min {ag['pillow_cos_min']:.4f}, median {ag['pillow_cos_median']:.4f}.")
    if "two_core" in res:
        tc = res["two_core"]
        t2 = [r["photos_per_s"] for r in tc["tract_2_threads"]["pass_rows"]]
        o2 = [r["photos_per_s"] for r in tc["ort_intra_op_2"]["pass_rows"]]
        p()
        p(f"Both cores: tract, 2 inference threads sharing one plan: {med(t2):.2f} photos/s "
          f"({med(t2) / 2:.2f}/core); ORT intra_op=2: {med(o2):.2f} photos/s ({med(o2) / 2:.2f}/core).")
    if "extras" in res:
        ex = res["extras"]
        t1 = [r["photos_per_s"] for r in ex["tract_passes"]]
        tr = [r["photos_per_s"] for r in ex["tract"]["reused_state"]]
        tb = [r["photos_per_s"] for r in ex["tract"]["batch"]["passes"]]
        ob = [r["photos_per_s"] for r in ex["ort_batch"]["passes"]]
        t1c = [r["photos_per_cpu_s"] for r in ex["tract_passes"]]
        trc = [r["photos_per_cpu_s"] for r in ex["tract"]["reused_state"]]
        tbc = [r["photos_per_cpu_s"] for r in ex["tract"]["batch"]["passes"]]
        obc = [r["photos_per_cpu_s"] for r in ex["ort_batch"]["passes"]]
        p()
        p("What might help (1 thread, photos/s wall and per CPU-s, median of passes):")
        p()
        p("| variant | photos/s | photos/CPU-s |")
        p("|---|---:|---:|")
        p(f"| tract, plan.run per photo (as OnnxEmbedder::embed) | {med(t1):.2f} | {med(t1c):.2f} |")
        p(f"| tract, one SimpleState reused | {med(tr):.2f} | {med(trc):.2f} |")
        p(f"| tract, batch {ex['tract']['batch']['size']} | {med(tb):.2f} | {med(tbc):.2f} |")
        p(f"| ORT, batch {ex['ort_batch']['size']} | {med(ob):.2f} | {med(obc):.2f} |")
        for name, prof in (("tract", ex["tract"]["profile"]), ("ORT", ex["ort_profile"])):
            top = ", ".join(f"{o['op']} {o['ms_per_inference']:.1f} ms ({o['nodes']})" for o in prof["ops"][:6])
            p()
            p(f"{name} per-operator time, ms per inference (nodes), over {prof['inferences']} inferences, "
              f"{prof['ms_per_inference']:.1f} ms each: {top}")
    if "decode" in res:
        p()
        p("Decode + preprocess per photo (JPEG q90, median of "
          f"{res['decode']['rust']['runs']} runs, ms):")
        p()
        p("Rust columns: decode + preprocess + quality measures. `before`: full decode, RGB copy "
          "and the image crate's resize (the embedder before reduced-scale decoding); `full`: "
          "full decode, SIMD preprocessing; `reduced`: decode_reduced at the embedder's minimum "
          f"shorter side ({res['decode']['rust']['rows'][0]['min_short']} px), as photo::analyse "
          "does. Pillow columns: decode + preprocess (no quality measures).")
        p()
        p("| MP | size | bytes | Rust before | Rust full | Rust reduced (decoded at) "
          "| Pillow full | Pillow draft (decoded at) | cos reduced vs full (tract) "
          "| cos draft vs full (ORT) | API upload check (decode at 1/8) |")
        p("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def parts(x):
            return (f"{x['decode_ms']:.1f} + {x['preprocess_ms']:.1f} + {x['quality_ms']:.1f} "
                    f"= **{x['total_ms']:.1f}**")

        for r, q in zip(res["decode"]["rust"]["rows"], res["decode"]["pillow"]):
            f, d = q["full"], q["draft"]
            red = r["reduced"]
            cos = r.get("reduced_vs_full_cos")
            p(f"| {r['megapixels']} | {r['width']}x{r['height']} | {r['bytes']} | {parts(r['before'])} | "
              f"{parts(r['full'])} | {parts(red)} ({red['decoded_size'][0]}x{red['decoded_size'][1]}) | "
              f"{f['decode_ms']:.1f} + {f['preprocess_ms']:.1f} | "
              f"{d['decode_ms']:.1f} + {d['preprocess_ms']:.1f} ({d['decoded_size'][0]}x{d['decoded_size'][1]}) | "
              f"{'n/a' if cos is None else f'{cos:.4f}'} | {q['draft_vs_full_cos']:.4f} | "
              f"{r['upload_check_ms']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
