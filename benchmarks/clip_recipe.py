"""Choose the CLIP-style teacher's recipe on the fit's own held-out pairs: the fit as configured, without and with
extra training pairs (`--extra-pairs`, e.g. data/demo/stamps) and with other settings (`--arm`), each over a few
seeds, in one process on the same cached tower features. Never reads an evaluation image: the figures are the caption source's held-out pairs (retrieval over all
of them, zero-shot over the ten categories on those with one).

    .venv/bin/python benchmarks/clip_recipe.py --pairs data/demo/captions --extra-pairs data/demo/stamps \\
        [--seeds 0 1 2] [--threads 2] [--cache-dir data/demo/.clip_fit_cache]
    .venv/bin/python benchmarks/clip_recipe.py --pairs data/demo/captions --seeds 0 1 \\
        --arm image_augment=mirror --arm image_augment=mirror,zoom_in,zoom_out

An arm is KEY=VALUE[;KEY=VALUE] over ClipFitConfig's fields (a list field takes comma-separated values).

Prints, per arm and seed, the kept check's held-out zero-shot and image->text / text->image R@1 and R@5 (with the
pool sizes) and the fit's time, then each arm's mean over the seeds. The fits are written to a temporary folder and
removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modalities.clip_fit import ClipFitConfig, fit_clip  # noqa: E402

FIGURES = ("zero_shot", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=Path, default=ROOT / "data" / "demo" / "captions")
    ap.add_argument("--extra-pairs", type=Path, action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arm", action="append", default=[], help="KEY=VALUE[;KEY=VALUE]: a fit with these settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, help="tower features (default: .clip_fit_cache beside --pairs)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cache = a.cache_dir or a.pairs.parent / ".clip_fit_cache"
    arms = [("the recipe", (), {})] + ([(f"with {', '.join(p.name for p in a.extra_pairs)}", tuple(a.extra_pairs), {})]
                                       if a.extra_pairs else [])
    arms += [(arm, (), _settings(arm)) for arm in a.arm]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="clip-recipe-") as tmp:
        for name, extra, settings in arms:
            for seed in a.seeds:
                t0 = time.monotonic()
                rec = fit_clip(a.pairs, Path(tmp) / f"{len(results)}-{seed}", ClipFitConfig(seed=seed, **settings),
                               cache_dir=cache, extra_sources=extra)
                sel = rec["selected"]
                results.setdefault(name, []).append(sel)
                print(f"{name}, seed {seed}: {rec['train']} training pairs; step {sel['step']}: held-out zero-shot "
                      f"{sel.get('zero_shot', float('nan')):.3f} (pool {sel.get('zero_shot_pool', 0)}), image->text "
                      f"R@1 {sel['i2t_r1']:.3f} R@5 {sel['i2t_r5']:.3f}, text->image R@1 {sel['t2i_r1']:.3f} R@5 "
                      f"{sel['t2i_r5']:.3f} (pool {sel['pool']}); {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\nmean over seeds {a.seeds}:")
    for name, rows in results.items():
        print(f"  {name}: " + ", ".join(f"{f} {np.mean([r.get(f, np.nan) for r in rows]):.3f}" for f in FIGURES))
    return 0


def _settings(arm: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(ClipFitConfig)}
    out = {}
    for item in filter(None, arm.split(";")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--arm {arm!r}: {key!r} is not a ClipFitConfig field ({', '.join(fields)})")
        default = getattr(ClipFitConfig(), key)
        if isinstance(default, list):
            out[key] = [v for v in value.split(",") if v]
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):  # bool is handled above
            out[key] = type(default)(value)
        elif default is None:
            out[key] = int(value) if value.isdigit() else value
        else:
            out[key] = value
    return out


if __name__ == "__main__":
    sys.exit(main())
