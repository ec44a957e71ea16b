"""The CLIP-style teacher's fit with more than one set of weights or more than one look at an image, on the fit's
own held-out pairs only: each seed's fit alone, a "soup" of the first 2 and of all seeds' image projections (their
weights averaged: one linear head, so the saved model stays a plain open_clip one), and each read with test-time
views (the image's embedding averaged with its mirror's, or with its mirror's and both zooms').

    .venv/bin/python benchmarks/clip_soup.py --pairs data/demo/captions --cache-dir data/demo/.clip_fit_cache \\
        --out /tmp/soup [--seeds 0 1 2 3]

Prints held-out zero-shot, image->text R@1/R@5 and text->image R@1 per arm. Never reads an evaluation image.
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
import torch.nn.functional as F  # noqa: E402

from modalities.clip_fit import (ClipFitConfig, fit_clip, image_features, image_view, open_local_dir,  # noqa: E402
                                 retrieval, text_features)
from modalities.clip_pairs import read_pairs  # noqa: E402
from modalities.image import decode_image  # noqa: E402

VIEW_SETS = (["own"], ["own", "mirror"], ["own", "mirror", "zoom_in", "zoom_out"])


def fit_seeds(pairs: Path, out: Path, seeds: list[int], cache: Path) -> dict:
    """{seed: (image projection weight, bias)} of each seed's fit (a fit already in out/s<seed> is reused)."""
    from safetensors.torch import load_file

    heads = {}
    for s in seeds:
        if not (out / f"s{s}" / "fit.json").is_file():
            fit_clip(pairs, out / f"s{s}", ClipFitConfig(seed=s), cache_dir=cache)
        sel = json.loads((out / f"s{s}" / "fit.json").read_text())["selected"]
        print("seed", s, {k: round(v, 3) for k, v in sel.items() if isinstance(v, float)}, flush=True)
        sd = load_file(str(out / f"s{s}" / "open_clip_model.safetensors"))
        heads[s] = (sd["visual.head.proj.weight"], sd["visual.head.proj.bias"])
    return heads


def heldout_features(pairs: Path, folder: Path, cfg: ClipFitConfig):
    """The held-out pairs, the frozen image tower's features of each view of their images, their captions' and the
    zero-shot prompts' normalised text embeddings (the text side is locked: the same for every seed)."""
    model, pre, tok = open_local_dir(folder)
    held = [p for p in read_pairs(pairs) if p.split == "heldout"]
    t0 = time.time()
    ims = [decode_image(p.read(), cfg.max_pixels, 1024) for p in held]
    feats = {"own": torch.from_numpy(image_features(model, pre, ims))}
    for v in ("mirror", "zoom_in", "zoom_out"):
        feats[v] = torch.from_numpy(image_features(model, pre, [image_view(im, v) for im in ims]))
    print(f"held-out image features, 4 views of {len(held)} images: {time.time() - t0:.0f} s", flush=True)
    with torch.no_grad():
        cap = F.normalize(torch.from_numpy(text_features(
            model, tok, [cfg.caption_template.replace("{caption}", p.caption) for p in held])), dim=-1)
        pr = torch.from_numpy(text_features(model, tok, [t.replace("{label}", c) for c in cfg.vocabulary
                                                         for t in cfg.templates]))
        pr = F.normalize(pr, dim=-1).view(len(cfg.vocabulary), len(cfg.templates), -1)
        cls = F.normalize(pr.mean(1), dim=-1)
    return held, feats, cap, cls


def score(W, b, views, held, feats, cap, cls, cfg: ClipFitConfig) -> str:
    zs = [i for i, p in enumerate(held) if p.category in cfg.vocabulary]
    with torch.no_grad():
        e = F.normalize(sum(F.normalize(feats[v] @ W.T + b, dim=-1) for v in views), dim=-1)
        r = retrieval(e.numpy(), cap.numpy(), [p.caption for p in held])
        pred = (e[zs] @ cls.T).argmax(-1).tolist()
        z = float(np.mean([cfg.vocabulary[j] == held[i].category for j, i in zip(pred, zs)]))
    return f"zero-shot {z:.3f} i2t R@1 {r['i2t_r1']:.3f} R@5 {r['i2t_r5']:.3f} t2i R@1 {r['t2i_r1']:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=Path, default=ROOT / "data" / "demo" / "captions")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True, help="a folder for the seeds' fits (kept: a second run reuses them)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ClipFitConfig()
    heads = fit_seeds(a.pairs, a.out, a.seeds, a.cache_dir or a.pairs.parent / ".clip_fit_cache")
    held, feats, cap, cls = heldout_features(a.pairs, a.out / f"s{a.seeds[0]}", cfg)
    for views in VIEW_SETS:
        for s in a.seeds:
            print(views, "seed", s, score(*heads[s], views, held, feats, cap, cls, cfg))
        for n in sorted({min(2, len(a.seeds)), len(a.seeds)}):
            W = torch.stack([heads[s][0] for s in a.seeds[:n]]).mean(0)
            b = torch.stack([heads[s][1] for s in a.seeds[:n]]).mean(0)
            print(views, f"soup of {n}", score(W, b, views, held, feats, cap, cls, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
