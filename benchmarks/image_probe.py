"""Can the drawings' labels be read from what the student reads? A control for [Images gain].

    .venv/bin/python benchmarks/image_probe.py RUN_DIR [RUN_DIR ...] [--json FILE]

A drawing reaches the student as one vector: the CLIP-style teacher's unit-norm image embedding that pseudo_label
stored beside its label, and the teacher's label is a linear function of it (the top of `scale * f @ class_emb.T`).
For each finished run this fits a linear probe (multinomial logistic regression, L-BFGS, a small L2 penalty) on
the **train** split's features and teacher labels, the labels the student trains on, and scores it on the held-out
(test) split: agreement with the teacher's label and with the drawing's category. Beside it: the teacher's own
category agreement and the run's students' (evaluate/report.json). If a probe on 268 drawings reads the teacher's
labels far better than the student does, the data size is not what holds the student back.

It also prints the scale at which the distilled student's cross-attention reads a drawing: the RMS of the
projected image state against the RMS of the Whisper encoder states the copied decoder was trained on (its
silence padding), on the held-out drawings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.pseudo_label import read_labelled  # noqa: E402


def image_rows(run: Path) -> list[dict]:
    """Every train and test drawing pseudo_label kept: key, split, teacher label, category, features [D]."""
    rows = []
    for _, rec, _, _, arrays in read_labelled(run / "pseudo_label", ["image"], ("train", "test")):
        if rec.get("filter_reason") or "features" not in arrays:
            continue
        rows.append({"key": rec.get("key"), "split": rec["split"], "label": rec["info"]["label"],
                     "reference": rec.get("reference"), "features": arrays["features"].astype(np.float32).reshape(-1)})
    return rows


def fit_probe(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3, scale: float = 20.0) -> torch.Tensor:
    """Multinomial logistic regression on scale * x, fitted to convergence by L-BFGS; returns [D + 1, C]."""
    X = torch.tensor(x) * scale
    X = torch.cat([X, torch.ones(len(X), 1)], 1)
    Y = torch.tensor(y)
    W = torch.zeros(X.shape[1], classes, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W, Y) + l2 * W[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def predict(W: torch.Tensor, x: np.ndarray, scale: float = 20.0) -> np.ndarray:
    X = torch.cat([torch.tensor(x) * scale, torch.ones(len(x), 1)], 1)
    return (X @ W).argmax(1).numpy()


def state_scale(run: Path, feats: np.ndarray) -> dict | None:
    """RMS of the distilled student's projected image states and of its Whisper silence states."""
    from stages.models.student import load_student

    best = run / "distill" / "best"
    if not (best / "student.json").is_file():
        return None
    s = load_student(best)
    if s.spec.style != "cross_attention" or "image" not in s.projectors:
        return None
    with torch.no_grad():
        states, _, _ = s._encoder_states("image", torch.tensor(feats).unsqueeze(1), None, len(feats))
    out = {"image_state_rms": float(states.pow(2).mean().sqrt()), "projector_norm": s.spec.projector_norm}
    if s.source_pad is not None:
        out["encoder_state_rms"] = float(s.source_pad.pow(2).mean().sqrt())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    print("| run | train drawings | held out | teacher: category | probe: teacher label / category | "
          "distilled: teacher label / category | adversarial: teacher label / category | image state RMS / encoder state RMS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in a.runs:
        run = Path(r)
        rows = image_rows(run)
        classes = sorted({x["label"] for x in rows})
        tr = [x for x in rows if x["split"] == "train"]
        te = [x for x in rows if x["split"] == "test"]
        if not tr or not te:
            raise SystemExit(f"{run}: no train or test drawings in pseudo_label/shards/image")
        W = fit_probe(np.stack([x["features"] for x in tr]), np.array([classes.index(x["label"]) for x in tr]),
                      len(classes))
        pred = [classes[i] for i in predict(W, np.stack([x["features"] for x in te]))]
        probe_label = float(np.mean([p == x["label"] for p, x in zip(pred, te)]))
        probe_cat = float(np.mean([p == x["reference"] for p, x in zip(pred, te)]))
        teacher_cat = float(np.mean([x["label"] == x["reference"] for x in te]))
        rep_path = run / "evaluate" / "report.json"
        img = json.loads(rep_path.read_text()).get("test", {}).get("image", {}) if rep_path.is_file() else {}
        scale = state_scale(run, np.stack([x["features"] for x in te]))
        res = {"train": len(tr), "test": len(te), "teacher_category": teacher_cat, "probe_label": probe_label,
               "probe_category": probe_cat, "students": {k: {m: img.get(k, {}).get(m) for m in
                                                             ("label_agreement", "category_agreement")}
                                                         for k in ("distill", "adversarial")}, "scale": scale}
        results[str(run)] = res

        def pair(k):
            m = res["students"][k]
            return "–" if m["label_agreement"] is None else f"{m['label_agreement']:.3f} / {m['category_agreement']:.3f}"

        sc = "–" if not scale else f"{scale['image_state_rms']:.3f} / {scale.get('encoder_state_rms', float('nan')):.3f}"
        print(f"| {run} | {len(tr)} | {len(te)} | {teacher_cat:.3f} | {probe_label:.3f} / {probe_cat:.3f} | "
              f"{pair('distill')} | {pair('adversarial')} | {sc} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
