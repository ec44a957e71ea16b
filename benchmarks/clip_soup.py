"""The CLIP-style teacher's fit with more than one set of weights or more than one look at an image, on the fit's
own held-out pairs only: each seed's fit alone, a "soup" of the first 2 and of all seeds' image projections (their
weights averaged: one linear head, so the saved model stays a plain open_clip one), and each read with test-time
views (the image's embedding averaged with its mirror's, or with its mirror's and both zooms').

    .venv/bin/python benchmarks/clip_soup.py --pairs data/demo/captions --cache-dir data/demo/.clip_fit_cache \
        --out /tmp/soup [--seeds 0 1 2 3]

Prints held-out zero-shot, image->text R@1/R@5 and text->image R@1 per arm. Never reads an evaluation image.
"""
import argparse
import sys, json, time
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np, torch, torch.nn.functional as F
from modalities.clip_fit import ClipFitConfig, fit_clip, open_local_dir, image_features, text_features, retrieval, image_view
from modalities.clip_pairs import read_pairs
from modalities.image import decode_image
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--pairs", type=Path, default=ROOT / "data" / "demo" / "captions")
ap.add_argument("--cache-dir", type=Path, default=None)
ap.add_argument("--out", type=Path, required=True, help="a folder for the seeds' fits (kept: a second run reuses them)")
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
SRC, OUT, seeds = a.pairs, a.out, a.seeds
CACHE = a.cache_dir or SRC.parent / ".clip_fit_cache"
recs = {}
for s in seeds:
    if not (OUT / f"s{s}" / "fit.json").is_file():
        fit_clip(SRC, OUT / f"s{s}", ClipFitConfig(seed=s), cache_dir=CACHE)
    recs[s] = json.loads((OUT / f"s{s}" / "fit.json").read_text())["selected"]
    print("seed", s, {k: round(v, 3) for k, v in recs[s].items() if isinstance(v, float)}, flush=True)
cfg = ClipFitConfig()
model, pre, tok = open_local_dir(OUT / "s0")
pairs = read_pairs(SRC)
held = [p for p in pairs if p.split == "heldout"]
t0 = time.time()
ims = [decode_image(p.read(), cfg.max_pixels, 1024) for p in held]
feats = {"own": torch.from_numpy(image_features(model, pre, ims))}
for v in ("mirror", "zoom_in", "zoom_out"):
    feats[v] = torch.from_numpy(image_features(model, pre, [image_view(im, v) for im in ims]))
print("features", time.time() - t0, flush=True)
with torch.no_grad():
    cap = F.normalize(torch.from_numpy(text_features(model, tok, [cfg.caption_template.replace("{caption}", p.caption) for p in held])), dim=-1)
    pr = torch.from_numpy(text_features(model, tok, [t.replace("{label}", c) for c in cfg.vocabulary for t in cfg.templates]))
    pr = F.normalize(pr, dim=-1).view(len(cfg.vocabulary), len(cfg.templates), -1)
    cls = F.normalize(pr.mean(1), dim=-1)
zs = [i for i, p in enumerate(held) if p.category in cfg.vocabulary]
heads = {}
from safetensors.torch import load_file
for s in seeds:
    sd = load_file(str(OUT / f"s{s}" / "open_clip_model.safetensors"))
    heads[s] = (sd["visual.head.proj.weight"], sd["visual.head.proj.bias"])
def score(W, b, views):
    with torch.no_grad():
        e = sum(F.normalize(feats[v] @ W.T + b, dim=-1) for v in views)
        e = F.normalize(e, dim=-1)
        r = retrieval(e.numpy(), cap.numpy(), [p.caption for p in held])
        pred = (e[zs] @ cls.T).argmax(-1).tolist()
        z = float(np.mean([cfg.vocabulary[j] == held[i].category for j, i in zip(pred, zs)]))
    return f"zero-shot {z:.3f} i2t R@1 {r['i2t_r1']:.3f} R@5 {r['i2t_r5']:.3f} t2i R@1 {r['t2i_r1']:.3f}"
for views in (["own"], ["own", "mirror"], ["own", "mirror", "zoom_in", "zoom_out"]):
    for s in seeds:
        print(views, "seed", s, score(*heads[s], views))
    for n in (2, 4):
        W = torch.stack([heads[s][0] for s in seeds[:n]]).mean(0); b = torch.stack([heads[s][1] for s in seeds[:n]]).mean(0)
        print(views, f"soup of {n}", score(W, b, views))
