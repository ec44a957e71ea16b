"""Where do the drawings go during the adversarial phase? A control for [Images gain].

    .venv/bin/python benchmarks/drawing_checkpoints.py RUN_DIR [RUN_DIR ...] [--split test] [--json FILE]

For each finished run: the distilled student, every adversarial checkpoint the run still holds
(adversarial/checkpoints/step-*) and the phase's final student, each greedy-decoding the held-out drawings
(`--split`, default test) as evaluate does. Per student: agreement with the teacher's label and with the drawing's
category (the image adapter's own metrics), the drawings whose caption changed against the distilled student's
(to the teacher's label / away from it / elsewhere), and the mean of the teacher's own score of the captions (its
zero-shot log-probability of the caption for the drawing: what the phase's drawings reward adds,
adversarial.teacher_score_weight). A checkpoint's step counts iterations, the judges' warm-up included
(adversarial.disc_warmup_steps); its student step is that less the warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.registry import modality_registry  # noqa: E402
from stages.models.generation import generate  # noqa: E402
from stages.models.student import load_student  # noqa: E402
from stages.pseudo_label import read_labelled  # noqa: E402

TIED = {"lm.proj_out.weight"}  # the output projection shares the token embedding (not stored in a checkpoint)


def drawings(run: Path, split: str) -> dict:
    feats, labels, cats, infos = [], [], [], []
    for _, rec, _, _, arrays in read_labelled(run / "pseudo_label", ["image"], (split,)):
        if rec.get("filter_reason") or "features" not in arrays:
            continue
        feats.append(torch.from_numpy(np.asarray(arrays["features"], dtype=np.float32)))
        labels.append(rec["text"])
        cats.append(rec.get("reference"))
        infos.append(rec.get("info", {}))
    return {"features": feats, "labels": labels, "categories": cats, "infos": infos}


@torch.no_grad()
def captions(student, feats: list, batch: int = 32) -> list[str]:
    out: list[str] = []
    for i in range(0, len(feats), batch):
        part = feats[i: i + batch]
        out += [t.strip() for t in generate(student, ["image"] * len(part), part, temperature=0.0,
                                            max_new_tokens=32).texts]
    return out


def students(run: Path):
    """(name, student) in phase order: distilled, each held checkpoint, final."""
    base = load_student(run / "distill" / "final").eval()
    yield "distilled", base
    from safetensors.torch import load_file

    for ck in sorted((run / "adversarial" / "checkpoints").glob("step-*")):
        st = copy.deepcopy(base)
        missing, unexpected = st.load_state_dict(load_file(str(ck / "model.student.safetensors")), strict=False)
        if unexpected or set(missing) - TIED:
            raise SystemExit(f"{ck}: not this run's student (missing {missing[:3]}, unexpected {unexpected[:3]})")
        yield ck.name, st
    final = run / "adversarial" / "final"
    if (final / "student.json").is_file():
        yield "final", load_student(final).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    report = {}
    for run in a.runs:
        cfg = load_config([str(run / "config.yaml")])
        adapter = modality_registry.get("image")(cfg.root.modalities["image"])
        teacher = adapter.build_teacher("cpu", store_features=False)
        scorer = getattr(teacher, "caption_scores", None)
        d = drawings(run, a.split)
        rows, base = [], None
        for name, st in students(run):
            hyps = captions(st, d["features"])
            m = adapter.metrics(hyps, d["labels"], d["categories"], d["infos"])
            row = {"student": name, "label_agreement": m.get("label_agreement"),
                   "category_agreement": m.get("category_agreement")}
            s = scorer(hyps, torch.stack(d["features"])) if scorer else None
            row["teacher_score"] = None if s is None else float(s.mean())
            if base is None:
                base = hyps
            else:
                changed = [i for i, (h, b) in enumerate(zip(hyps, base)) if h != b]
                row["changed"] = len(changed)
                row["to_label"] = sum(hyps[i] == d["labels"][i] for i in changed)
                row["from_label"] = sum(base[i] == d["labels"][i] for i in changed)
            rows.append(row)
        report[str(run)] = {"n": len(d["labels"]), "rows": rows}
        print(f"\n{run} ({len(d['labels'])} {a.split} drawings)")
        print("| student | label agreement | category agreement | teacher score | changed: to label / from label / total |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            ch = f"{r['to_label']} / {r['from_label']} / {r['changed']}" if "changed" in r else ""
            ts = "" if r["teacher_score"] is None else f"{r['teacher_score']:.3f}"
            print(f"| {r['student']} | {r['label_agreement']:.3f} | {r['category_agreement']:.3f} | {ts} | {ch} |")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
