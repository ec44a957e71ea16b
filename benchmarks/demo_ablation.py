"""MLE-only vs adversarial, anchored vs unanchored, over seeds, on the demo data's held-out split.

    .venv/bin/python benchmarks/demo_ablation.py [--seeds 0 1] [--out runs/ablation] [--reuse runs/demo] [key=value ...]

For each seed S this runs the whole demo graph with `seed=S` (ingest and pseudo_label reused from --reuse when
their config matches), then the same run with `adversarial.anchored=false` reusing everything up to distill,
so both adversarial students start from the same distilled one. Then it prints, per seed, the held-out
figures of the distilled, anchored and unanchored students side by side (WER with its 95% bootstrap interval,
image label agreement, distinct-2, self-BLEU-4, 5-gram repeats, the discriminators' accuracy), the relative
WER change of each adversarial student against its distilled one, and writes `groundgan compare` of every
run into OUT/compare. Extra key=value arguments go to every run (e.g. adversarial.steps=40).
Nothing here is timed; the figures are the runs' own report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"


def run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pipeline", *args]
    print("+ groundgan " + " ".join(args), flush=True)
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"groundgan {' '.join(args)} exited {r.returncode}")


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "evaluate" / "report.json").read_text())


def fmt(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def row(name: str, m: dict, base_wer: float | None) -> str:
    wer, ci = m.get("wer_vs_reference"), m.get("wer_vs_reference_ci")
    rel = "" if base_wer in (None, 0) or wer is None else f"{(wer - base_wer) / base_wer:+.1%}"
    ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (f"| {name} | {fmt(wer)}{ci_s} | {rel} | {fmt(m.get('wer_vs_teacher'))} | {fmt(m.get('distinct_2'))} | "
            f"{fmt(m.get('self_bleu_4'))} | {m.get('rep_5gram', '–')} | {fmt(m.get('disc_accuracy'))} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--reuse", default="runs/demo", help="a finished demo run whose ingest/pseudo_label to reuse")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    a = ap.parse_args()
    out = ROOT / a.out
    runs: list[Path] = []
    for seed in a.seeds:
        anchored, unanchored = out / f"seed{seed}", out / f"seed{seed}-unanchored"
        reuse = ["--reuse", a.reuse] if (ROOT / a.reuse).is_dir() else []
        run(["run", str(CONFIG), f"seed={seed}", *a.overrides, "--run-dir", str(anchored), *reuse])
        run(["run", str(CONFIG), f"seed={seed}", "adversarial.anchored=false", *a.overrides,
             "--run-dir", str(unanchored), "--reuse", str(anchored)])
        runs += [anchored, unanchored]

    lines = ["| student | WER vs reference [95% CI] | vs distilled | WER vs teacher | distinct-2 | self-BLEU-4 | "
             "5-gram repeats | disc accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    images = ["| seed | distilled | anchored | unanchored |", "|---|---:|---:|---:|"]
    for seed in a.seeds:
        ra, ru = report(out / f"seed{seed}")["test"], report(out / f"seed{seed}-unanchored")["test"]
        aud_a, aud_u = ra.get("audio", {}), ru.get("audio", {})
        base = aud_a.get("distill", {}).get("wer_vs_reference")
        lines.append(row(f"seed {seed} teacher", aud_a.get("teacher", {}), None))
        lines.append(row(f"seed {seed} distilled (MLE)", aud_a.get("distill", {}), None))
        lines.append(row(f"seed {seed} adversarial, anchored", aud_a.get("adversarial", {}), base))
        lines.append(row(f"seed {seed} adversarial, unanchored", aud_u.get("adversarial", {}), base))
        img_a, img_u = ra.get("image", {}), ru.get("image", {})
        if img_a:
            images.append(f"| {seed} | {fmt(img_a.get('distill', {}).get('label_agreement'))} | "
                          f"{fmt(img_a.get('adversarial', {}).get('label_agreement'))} | "
                          f"{fmt(img_u.get('adversarial', {}).get('label_agreement'))} |")
    print("\n## held-out audio (test split)\n")
    print("\n".join(lines))
    print("\n## held-out images: agreement with the teacher's labels\n")
    print("\n".join(images))
    run(["compare", *map(str, runs), "--out", str(out / "compare")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
