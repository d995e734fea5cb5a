#!/usr/bin/env python3
"""How far degraded shots (noise, blur, dark, small) lie from their scene in the embedding the
service uses, against how close different scenes come, for labelled folders (labels.csv:
file,scene,degraded; scripts/footage_set.py builds such sets from real video frames).

Per folder and embedding variant it prints:
- `inter`: the smallest cosine distance between clean photos (degraded = 0) of different scenes;
- `deg->own p50/p90/max`: each degraded photo's distance to the nearest clean photo of its scene;
- `within eps`: the share of degraded photos within `--eps` of a clean photo of their scene;
- `nearest right`: the share whose nearest clean photo is of their own scene;
- `ARI`: DBSCAN (cosine, `--eps`, `--min-points`, noise as singletons) against the scenes.
A single threshold separates scenes and keeps degraded shots with them only when the degraded
distances sit below `inter`.

Variants: `service` (the model's own average pool, the `Reshape` tensor: the service's
embedding with `embedder.output = "Reshape"`, `gem_p = 0`, `denoise_sigma = 0`), `denoise-S` (a
photo whose noise at the model's scale is above `--noisy` levels is blurred with a Gaussian of
sigma S at the resize scale before the crop), `gem` (generalised-mean pooling, p = `--gem-p`,
of the last block instead of the average), `gem+dn-1` (both) and `gem+dn+lp` (both, and a
second view of each photo, its crop low-passed with sigma `--low-pass` and reduced to
`--low-size` pixels, run through the model's trunk at that size: a photo whose detail, the
share of what that low-pass removed from its luminance that a Gaussian of one pixel removes
too, is at most `--blurred-below` is blurred, as is a photo smoothed for its noise, and
pairs with a blurred photo are compared by
the low-passed views, within `--low-eps`, two blurred photos within `--both-blurred-eps`; with
`--gem-p 2 --eps 0.14`, the service's default). For `gem+dn+lp` the distances listed are the
low-passed views' for blurred copies.

Usage (from the repo root): robustness_probe.py FOLDER... [--eps 0.18] [--min-points 2] [--noisy 6]
       [--gem-p 3] [--low-pass 5] [--low-size 128] [--low-eps 0.16] [--both-blurred-eps 0.16]
       [--blurred-below 0.015]
Needs: pip install onnx onnxruntime numpy pillow scipy scikit-learn; the model (make model).
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageFilter, ImageOps
from scipy.ndimage import convolve
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepare_model import truncated  # noqa: E402
from reference_loop import centre_crop, crop_normalise, normalise, resize_short  # noqa: E402

IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def model_noise(img: Image.Image) -> float:
    """Immerkaer's estimate on the luminance at the scale the model sees the photo (shorter
    side 256), as the service decides on smoothing (actors/src/algo/embed.rs)."""
    g = np.asarray(img.convert("L"), np.float64)
    r = np.abs(convolve(g, IMMERKAER)[1:-1, 1:-1])
    sigma = np.sqrt(np.pi / 2) * r.sum() / (6 * r.size)
    return sigma * min(1.0, 256 / min(g.shape))


def sessions(model_path: Path):
    model = onnx.load(str(model_path))
    pooled = next(n for n in model.graph.node if n.name == "Reshape").output[0]
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    last = pool.input[0]
    for name in (pooled, last):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    # The trunk up to the last block with a free input size, for the reduced low-passed view.
    trunk = truncated(onnx.load(str(model_path)), last)
    t = ort.InferenceSession(trunk.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s, t, s.get_inputs()[0].name, pooled, last


def luma(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), np.float64)


def detail(crop: Image.Image, low: Image.Image) -> float:
    """What the service's `embed::detail` measures: of the luminance energy the low-pass
    removed, the share a Gaussian of one pixel removes too."""
    y = luma(crop)
    removed = ((y - luma(low)) ** 2).mean()
    finest = ((y - luma(crop.filter(ImageFilter.GaussianBlur(1)))) ** 2).mean()
    return finest / removed if removed > 1e-3 else 0.0


def unit(v):
    return v / np.linalg.norm(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, default=Path("models/open-nsfw.onnx"))
    ap.add_argument("--eps", type=float, default=0.18)
    ap.add_argument("--min-points", type=int, default=2)
    ap.add_argument("--noisy", type=float, default=6.0)
    ap.add_argument("--gem-p", type=float, default=3.0)
    ap.add_argument("--low-pass", type=float, default=5.0)
    ap.add_argument("--low-size", type=int, default=128)
    ap.add_argument("--low-eps", type=float, default=0.16)
    ap.add_argument("--both-blurred-eps", type=float, default=0.16)
    ap.add_argument("--blurred-below", type=float, default=0.015)
    args = ap.parse_args()
    sess, trunk, input_name, pooled, last = sessions(args.model)

    def gem_pool(block):
        p = args.gem_p
        block = np.maximum(block[0], 0)
        # positions x channels, whichever layout the pooled block has
        block = block.reshape(block.shape[0], -1).T if block.shape[0] > block.shape[-1] else block.reshape(-1, block.shape[-1])
        return unit((block ** p).mean(0) ** (1 / p))

    def embed(resized):
        out, block = sess.run([pooled, last], {input_name: crop_normalise(resized)})
        return unit(out.reshape(-1)), gem_pool(block)

    def embed_low(resized):
        """The low-passed view and the detail: the service blurs the 224 crop itself, then
        reduces it (actors/src/algo/embed.rs, embed_views)."""
        crop = centre_crop(resized)
        low = crop.filter(ImageFilter.GaussianBlur(args.low_pass))
        x = normalise(low.resize((args.low_size, args.low_size), Image.BILINEAR))
        return gem_pool(trunk.run(None, {input_name: np.ascontiguousarray(x)})[0]), detail(crop, low)

    for folder in args.folders:
        rows = list(csv.DictReader(open(folder / "labels.csv")))
        scenes = np.array([r["scene"] for r in rows])
        clean = np.array([r["degraded"] == "0" for r in rows])
        variants = {"service": [], "gem": [], "gem+dn-1": [], "denoise-1": [], "denoise-2": []}
        low, details, was_smoothed = [], [], []
        for r in rows:
            img = ImageOps.exif_transpose(Image.open(folder / r["file"])).convert("RGB")
            resized = resize_short(img)
            service, gem = embed(resized)
            variants["service"].append(service)
            variants["gem"].append(gem)
            noisy = model_noise(img) > args.noisy
            was_smoothed.append(noisy)
            for s in (1, 2):
                smoothed = embed(resized.filter(ImageFilter.GaussianBlur(s))) if noisy else (service, gem)
                variants[f"denoise-{s}"].append(smoothed[0])
                if s == 1:
                    variants["gem+dn-1"].append(smoothed[1])
                    seen = resized.filter(ImageFilter.GaussianBlur(1)) if noisy else resized
                    lv, det = embed_low(seen)
                    low.append(lv)
                    details.append(det)
        variants["gem+dn+lp"] = variants["gem+dn-1"]
        print(f"{folder}: {len(rows)} photos, {len(set(scenes))} scenes, {int((~clean).sum())} degraded")
        for name, vectors in variants.items():
            e = np.stack(vectors)
            d = 1 - e @ e.T
            scaled = d / args.eps
            if name == "gem+dn+lp":
                lv = np.stack(low)
                dl = 1 - lv @ lv.T
                # As the service: a photo smoothed for its noise counts as blurred too.
                blurred = (np.array(details) <= args.blurred_below) | np.array(was_smoothed)
                either, both = blurred[:, None] | blurred[None, :], blurred[:, None] & blurred[None, :]
                scaled = np.where(both, dl / args.both_blurred_eps, np.where(either, dl / args.low_eps, scaled))
                # A blurred copy's distance is its low-passed view's, on the scale of eps.
                d = np.where(either, dl * args.eps / args.low_eps, d)
                print(f"  {name:10s} blurred: {int(blurred.sum())} photos, {int((blurred & clean).sum())} of them clean")
            other = scenes[:, None] != scenes[None, :]
            inter = d[np.ix_(clean, clean)][other[np.ix_(clean, clean)]].min()
            deg = np.where(~clean)[0]
            own = np.array([d[i, clean & (scenes == scenes[i])].min() for i in deg])
            near_other = np.array([d[i, clean & (scenes != scenes[i])].min() for i in deg])
            labels = DBSCAN(eps=1.0, min_samples=args.min_points, metric="precomputed").fit(np.maximum(scaled, 0)).labels_
            labels = [l if l >= 0 else -1 - i for i, l in enumerate(labels)]
            print(f"  {name:10s} inter {inter:.3f}  deg->own p50 {np.median(own):.3f} p90 {np.quantile(own, 0.9):.3f}"
                  f" max {own.max():.3f}  within eps {np.mean(own <= args.eps):.2f}"
                  f"  nearest right {np.mean(own < near_other):.2f}  ARI {adjusted_rand_score(scenes, labels):.3f}")
            # By kind of degradation (the file name's last `_` part: noise20, blur6, small...).
            kinds = np.array([Path(rows[i]["file"]).stem.rsplit("_", 1)[-1] for i in deg])
            print("             " + "  ".join(
                f"{k} {np.median(own[kinds == k]):.3f}/{np.mean(own[kinds == k] <= args.eps):.0%}"
                for k in sorted(set(kinds))))


if __name__ == "__main__":
    main()
