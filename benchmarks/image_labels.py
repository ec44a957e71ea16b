"""How well the offline image teachers' labels fit real drawings: the efficientnet_lite0 ImageNet classifier over
the 483 openclipart drawings in shared/data, each label mapped to one of the ten categories by the MiniLM
sentence encoder, compared with the drawing's folder category; with --clip, the CLIP-style teacher of that
folder (`groundgan teacher fit-clip`) zero-shot over the ten categories, on the same decoded drawings in the
same process.

    .venv/bin/python benchmarks/image_labels.py [--data DIR] [--resize squash pad] [--batch 32]
        [--clip DIR [--template "a drawing of {label}" ...] [--descriptions-from PAIRS]]

Prints a dozen examples, the label -> category map, and per teacher (and resize mode): category agreement, the
share of the most common category (what always answering it would score) and their ratio, mean confidence, and
time; with --clip, the CLIP teacher's agreement over the classifier's.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modalities.image import Image, ImageConfig, ImageTeacherConfig  # noqa: E402
from pipeline.errors import BadInput  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "images" / "openclipart"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with labels.jsonl and the JPEGs")
    ap.add_argument("--resize", nargs="+", default=["squash", "pad"], help="teacher resize modes to compare")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clip", type=Path, help="a CLIP-style teacher folder (open_clip local-dir), scored beside the classifier")
    ap.add_argument("--template", action="append", help="the CLIP teacher's prompts, {label} the category (repeatable; "
                                                        "default: the prompt ensemble of configs/demo.yaml)")
    ap.add_argument("--descriptions-from", type=Path, metavar="PAIRS",
                    help="also score the CLIP teacher with each category described by this caption source's folder "
                         "taxonomy (its training pairs' `source` paths; CHiLS), beside it without descriptions")
    a = ap.parse_args()
    if not (a.data / "labels.jsonl").is_file():
        print(f"skipped: no labels.jsonl in {a.data} (the shared/data folder beside the project)")
        return 0
    torch.set_num_threads(a.threads)
    rows = [json.loads(x) for x in (a.data / "labels.jsonl").read_text().splitlines() if x.strip()]
    categories = sorted({r["category"] for r in rows})

    arms = [(f"classifier, resize={mode}", ImageConfig(resize=mode, categories=categories)) for mode in a.resize]
    if a.clip:
        templates = a.template or _overlay_templates()
        arms.append(("clip", ImageConfig(categories=categories, caption="a drawing of {label}", teacher=ImageTeacherConfig(
            kind="clip", checkpoint=str(a.clip), vocabulary=categories, templates=templates))))
        if a.descriptions_from:
            from modalities.image import taxonomy_descriptions

            desc = taxonomy_descriptions(a.descriptions_from, categories)
            print(f"descriptions from {a.descriptions_from}'s training folders: "
                  + "; ".join(f"{c}: {len(v)}" for c, v in desc.items()))
            arms.append(("clip+descriptions", ImageConfig(
                categories=categories, caption="a drawing of {label}", teacher=ImageTeacherConfig(
                    kind="clip", checkpoint=str(a.clip), vocabulary=categories, templates=templates,
                    descriptions=desc))))
    agreement = {}
    for n_mode, (arm, cfg) in enumerate(arms):
        mode = arm
        modality = Image(cfg)
        Image.validate_config(cfg, "modalities.image")
        t0 = time.monotonic()
        teacher = modality.build_teacher("cpu", store_features=False)
        t_load = time.monotonic() - t0
        kept, images, rejected = [], [], []
        for r in rows:
            try:
                images.append(modality.decode((a.data / r["image"]).read_bytes(), Path(r["image"]).suffix[1:]))
                kept.append(r)
            except BadInput as e:
                rejected.append((r["image"], e.reason))
        t0 = time.monotonic()
        labels = []
        for i in range(0, len(images), a.batch):
            labels.extend(teacher.label(images[i: i + a.batch]))
        t_label = time.monotonic() - t0
        captions = [lab.text for lab in labels]
        refs = [r["category"] for r in kept]
        t0 = time.monotonic()
        m = modality.metrics(captions, captions, refs, [lab.info for lab in labels])
        t_map = time.monotonic() - t0
        mapping = m["label_to_category"]

        if n_mode == 0 or arm.startswith("clip"):
            print(f"\nteacher {teacher.name} (sha256 {teacher.sha256[:12]}), {len(kept)} drawings from {a.data}"
                  + (f", {len(rejected)} rejected: {rejected[:3]}" if rejected else ""))
            if arm.startswith("clip"):
                print(f"  zero-shot over the {len(categories)} categories, prompts: {cfg.teacher.templates}")
            print(f"\nexamples ({mode}):")
            print(f"  {'file':24s} {'category':15s} {'teacher label':24s} {'conf':>5s}  mapped to")
            for i in range(0, len(kept), max(1, len(kept) // 12))[:12]:
                info = labels[i].info
                print(f"  {kept[i]['image']:24s} {refs[i]:15s} {info['label']:24s} {info['confidence']:5.2f}  "
                      f"{mapping[info['label']]}")
            print(f"\nlabel -> category ({len(mapping)} distinct labels):")
            by_cat = collections.defaultdict(list)
            for lab, cat in sorted(mapping.items()):
                by_cat[cat].append(lab)
            for cat in categories:
                print(f"  {cat:15s} {', '.join(by_cat.get(cat, [])) or '-'}")

        hits = collections.Counter(refs[i] for i, lab in enumerate(labels) if mapping[lab.info['label']] == refs[i])
        totals = collections.Counter(refs)
        majority = max(totals.values()) / len(refs)
        conf = np.array([lab.info["confidence"] for lab in labels])
        agreement[arm] = m["category_agreement"]
        print(f"\n{mode}: category agreement {m['category_agreement']:.3f} ({sum(hits.values())}/{len(refs)}); "
              f"most common category {majority:.3f}; ratio {m['category_agreement'] / majority:.2f}x; "
              f"mean confidence {conf.mean():.3f}; label agreement of the teacher's own captions {m['label_agreement']:.2f}")
        print("  per category: " + ", ".join(f"{c} {hits[c]}/{totals[c]}" for c in categories))
        print(f"  time: load {t_load:.1f} s, label {t_label:.1f} s ({len(images) / t_label:.1f} images/s, "
              f"{a.threads} threads), map {t_map:.1f} s")
    if a.clip:
        print("\nsame drawings, same process: " + "; ".join(f"{arm} {v:.3f}" for arm, v in agreement.items())
              + "".join(f"; {c} / {arm} {agreement[c] / v:.2f}x" for c in agreement if c.startswith("clip")
                        for arm, v in agreement.items() if not arm.startswith("clip")))
    return 0


def _overlay_templates() -> list[str]:
    import yaml

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    return demo["modalities"]["image"]["teacher"]["templates"]


if __name__ == "__main__":
    sys.exit(main())
