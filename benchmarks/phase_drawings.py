"""More real drawings for the adversarial phase alone: a control for [Images gain] (docs/results.md).

    .venv/bin/python benchmarks/phase_drawings.py --captions data/demo/captions --out data/demo/phase_drawings [--n 600]

Writes OUT/ with N drawings spread evenly over the caption source's *training* pairs (`groundgan data demo`'s
captions/: never a reserved drawing, never one with the pixels of a demo drawing or of ../shared/data; its held-out
pairs are never read), their images copied and a manifest.jsonl (`image`, and the package path as `source`), and
OUT/overlay.yaml, a config overlay that adds them to the demo as a source whose every input lands in the pool
(`split: pool`): the teacher labels them, distill never trains on them, the phase reads them. The demo's own
sources and splits are unchanged.

    groundgan run configs/demo.yaml data/demo/phase_drawings/overlay.yaml --run-dir runs/phase-drawings --reuse runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, required=True, help="the caption source (captions.jsonl beside its images)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=600)
    a = ap.parse_args()
    rows = [json.loads(line) for line in (a.captions / "captions.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    if len(train) < a.n:
        raise SystemExit(f"{a.captions}: {len(train)} training pairs, fewer than --n {a.n}")
    pick = [train[int(i * len(train) / a.n)] for i in range(a.n)]
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "manifest.jsonl.tmp"
    with tmp.open("w") as f:
        for r in pick:
            shutil.copyfile(a.captions / r["image"], a.out / Path(r["image"]).name)
            f.write(json.dumps({"image": Path(r["image"]).name, "source": r.get("source")}) + "\n")
    tmp.replace(a.out / "manifest.jsonl")
    demo = a.captions.resolve().parent  # the demo's data folder: speech/ and images/ beside captions/
    rel = {k: os.path.relpath(demo / k, a.out.resolve()) for k in ("speech", "images")}
    overlay = (
        "# the demo's sources, and more real drawings held back for the phase alone (benchmarks/phase_drawings.py)\n"
        "ingest:\n  sources:\n"
        f"    - {{modality: audio, dir: {rel['speech']}, manifest: transcripts.jsonl, name: asterisk}}\n"
        f"    - {{modality: image, dir: {rel['images']}, manifest: labels.jsonl, name: openclipart}}\n"
        "    - {modality: image, dir: ., manifest: manifest.jsonl, name: phase_drawings, split: pool}\n")
    (a.out / "overlay.yaml.tmp").write_text(overlay)
    (a.out / "overlay.yaml.tmp").replace(a.out / "overlay.yaml")
    print(f"{a.out}: {len(pick)} of {len(train)} training drawings; overlay {a.out / 'overlay.yaml'} (its paths are "
          "read from its own folder)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
