"""The fit's frozen image-tower features (modalities.clip_fit.image_features): the layout and batch the fit uses
against the plain one (contiguous tensors, 64 images a call), on the same decoded images in one process,
alternating so both see the same load; also how long decoding and preprocessing take beside the tower.

    .venv/bin/python benchmarks/clip_features.py --pairs data/demo/captions --model data/demo/clip_teacher [--n 256]

Prints seconds per image for each part, the ratio, and the largest difference between the two ways' features.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modalities.clip_fit import image_features, open_local_dir  # noqa: E402
from modalities.image import decode_image  # noqa: E402


def plain_features(model, preprocess, images: list, batch: int = 64) -> np.ndarray:
    """The baseline: the tower as open_clip builds it, 64 images a call."""
    out = []
    trunk = model.visual.trunk.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            out.append(trunk(torch.stack([preprocess(im) for im in images[i: i + batch]])).float())
    return torch.cat(out).numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=Path, required=True, help="a caption source folder (captions.jsonl + images)")
    ap.add_argument("--model", type=Path, required=True, help="a fit-clip folder (its image tower is timed)")
    ap.add_argument("--n", type=int, default=256, help="images")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in (a.pairs / "captions.jsonl").read_text().splitlines() if line.strip()][: a.n]
    model, preprocess, _ = open_local_dir(a.model)
    t0 = time.perf_counter()
    images = [decode_image((a.pairs / r["image"]).read_bytes(), 50_000_000, 1024) for r in rows]
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for im in images:
        preprocess(im)
    t_pre = time.perf_counter() - t0
    times = {"plain": 0.0, "fit": 0.0}
    feats = {}
    for _ in range(a.rounds):
        for name, fn in (("plain", plain_features), ("fit", image_features)):
            t0 = time.perf_counter()
            feats[name] = fn(model, preprocess, images)
            times[name] += time.perf_counter() - t0
    n = len(images) * a.rounds
    print(f"{len(images)} images from {a.pairs}, {a.rounds} rounds, {a.threads} thread(s)")
    print(f"decode {1000 * t_decode / len(images):.1f} ms/image, preprocess {1000 * t_pre / len(images):.1f} ms/image")
    for name in times:
        print(f"{name}: {1000 * times[name] / n:.1f} ms/image (preprocessing included)")
    print(f"plain / fit: {times['plain'] / times['fit']:.2f}x; largest feature difference "
          f"{float(np.abs(feats['plain'] - feats['fit']).max()):.2e} (features up to {float(np.abs(feats['plain']).max()):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
