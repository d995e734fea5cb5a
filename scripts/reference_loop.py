#!/usr/bin/env python3
"""The reference the service is measured against: the plain Python loop a user might write
instead of running it (scripts/bench_e2e.py runs it in the same run; see BENCHMARKS.md).

For each pet, every photo is decoded with Pillow (EXIF orientation applied, RGB), resized
(shorter side 256, bilinear), centre-cropped to 224 and normalised as open-nsfw wants (BGR,
mean subtracted, NHWC); ONNX Runtime embeds it with the same model, one photo per call, with
`--threads` intra-op threads, taking the model's own pooled layer (the `Reshape` node's
output, L2-normalised: the whole network runs, as for the service's default, which pools the
block before it by GeM instead); then scikit-learn's DBSCAN (cosine distance, `--eps` and
`--min-points`, the service's defaults) clusters the pet's embeddings. Nothing is stored.

Prints one JSON line: photos, seconds, photos_per_second, clusters per pet, CPU seconds.
Usage: reference_loop.py --model models/open-nsfw.onnx --photos tests/fixtures/photos
       [--pets 4] [--copies 1] [--threads 2] [--eps 0.18] [--min-points 2]
"""
import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageOps

MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


def session(model_path: Path, threads: int):
    model = onnx.load(str(model_path))
    # The embedding is an inner tensor (the pooled features before the classifier), so it is
    # made a graph output, as the service does.
    node = next(n for n in model.graph.node if n.name == "Reshape")
    name = node.output[0]
    if name not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s, s.get_inputs()[0].name, name


def preprocess(path: Path) -> np.ndarray:
    return preprocess_image(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def resize_short(img: Image.Image) -> Image.Image:
    """The photo with its shorter side at 256, as the service resizes it before the crop."""
    w, h = img.size
    k = 256 / min(w, h)
    return img.resize((max(256, round(w * k)), max(256, round(h * k))), Image.BILINEAR)


def preprocess_image(img: Image.Image) -> np.ndarray:
    """The model input of an RGB photo."""
    return crop_normalise(resize_short(img))


def centre_crop(img: Image.Image) -> Image.Image:
    """The centre 224 square of a photo already resized by `resize_short`."""
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return img.crop((left, top, left + 224, top + 224))


def normalise(img: Image.Image) -> np.ndarray:
    """The model input from a square image: BGR, mean subtracted, NHWC."""
    x = np.asarray(img, dtype=np.float32)[:, :, ::-1] - MEAN_BGR
    return x[None, ...]


def crop_normalise(img: Image.Image) -> np.ndarray:
    """The model input from a photo already resized by `resize_short`: its centre crop,
    normalised."""
    return normalise(centre_crop(img))


def main():
    # Imported here: the preprocessing above serves scripts without scikit-learn too
    # (prepare_model.py's calibration, robustness_probe.py).
    from sklearn.cluster import DBSCAN

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/open-nsfw.onnx"))
    ap.add_argument("--photos", type=Path, default=Path("tests/fixtures/photos"))
    ap.add_argument("--pets", type=int, default=4)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.14)
    ap.add_argument("--min-points", type=int, default=2)
    args = ap.parse_args()

    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    sess, input_name, output_name = session(args.model, args.threads)
    sess.run([output_name], {input_name: preprocess(files[0])})  # warm up, as the service is

    cpu0, t0 = time.process_time(), time.perf_counter()
    clusters = []
    for _pet in range(args.pets):
        embeddings = []
        for _copy in range(args.copies):
            for f in files:
                v = sess.run([output_name], {input_name: preprocess(f)})[0].reshape(-1)
                embeddings.append(v / np.linalg.norm(v))
        labels = DBSCAN(eps=args.eps, min_samples=args.min_points, metric="cosine").fit(np.stack(embeddings)).labels_
        clusters.append(len(set(labels) - {-1}))
    seconds = time.perf_counter() - t0
    n = args.pets * args.copies * len(files)
    print(json.dumps({
        "photos": n,
        "seconds": round(seconds, 3),
        "photos_per_second": round(n / seconds, 2),
        "cpu_seconds": round(time.process_time() - cpu0, 2),
        "threads": args.threads,
        "onnxruntime": ort.__version__,
        "clusters_per_pet": clusters,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
