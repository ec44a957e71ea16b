"""MLE-only vs adversarial, anchored vs unanchored, over seeds, on the demo data's held-out split.

    .venv/bin/python benchmarks/demo_ablation.py [--seeds 0 1] [--out runs/ablation] [--reuse runs/demo]
        [--arms onpolicy_kd text_judge unanchored] [key=value ...]

For each seed S this runs the whole demo graph with `seed=S` (ingest and pseudo_label reused from --reuse when
their config matches; the demo keeps the adversarial step with the lowest val WER, the distilled student
included), then runs that reuse everything up to distill, so that every adversarial student starts from
the same distilled one, each keeping its last step (`adversarial.select_by=last`): the anchored phase as it
ends (`last`), `adversarial.anchored=false` (the ablation of anchoring: no label, and a copy of the distilled
student in place of the teacher's decoder as the audio judge) and `adversarial.pg_weight=0` (the same
phase without the discriminators' rewards: its cross-entropy and KL terms alone, i.e. more likelihood training
at the adversarial learning rate - what the GAN part must beat), and the [Grounding proof] controls, each an
overlay under configs/arms/ with the recipe's selection: `onpolicy_kd` (no learned judge head: the teacher
decoder's log-likelihood less the student's is the reward, on-policy reverse-KL distillation), `text_judge`
(the judge's head reads the text alone, GAD-style), `no_reward` (the phase's cross-entropy and KL alone, no head),
`mle_pool` (no phase: distill trains on the pool's labels too; read at its distill checkpoint), `long_inputs`
(the pool's long clips drawn more often) and `summed_reward` (the reward as it was before `length_neutral`). Then it prints, per seed, the held-out
figures of the distilled and adversarial students side by side (WER with its 95% bootstrap interval,
image label agreement, distinct-2, self-BLEU-4, 5-gram repeats, the discriminators' accuracy), over every
clip and over the short-form clips (<= 30 s), the relative WER change of each against its distilled student, and writes `groundgan compare` of every
run into OUT/compare. With --greedy-too, every run is scored again with plain greedy decoding (no temperature
fallback), which shows the repetition loops the fallback hides. Extra key=value arguments go to every run (e.g. adversarial.steps=40).
Nothing here is timed; the figures are the runs' own report.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ablation_summary import checkpoint  # benchmarks/, this script's folder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
# (run name suffix, overrides): the demo's own adversarial run first, then runs that reuse its distill stage
ALL_ARMS = [("", []),
        ("last", ["adversarial.select_by=last"]),
        ("unanchored", ["adversarial.anchored=false"]),
        ("mle", ["adversarial.pg_weight=0", "adversarial.select_by=last"]),
        ("onpolicy_kd", [str(ROOT / "configs/arms/onpolicy_kd.yaml")]),
        ("text_judge", [str(ROOT / "configs/arms/text_judge.yaml")]),
        ("no_reward", [str(ROOT / "configs/arms/no_reward.yaml")]),
        ("mle_pool", [str(ROOT / "configs/arms/mle_pool.yaml")]),
        ("long_inputs", [str(ROOT / "configs/arms/long_inputs.yaml")]),
        ("summed_reward", [str(ROOT / "configs/arms/summed_reward.yaml")])]
ARMS = list(ALL_ARMS)  # the ones this run makes (--arms)
LABELS = {"": "adversarial, anchored, picked by val WER", "last": "adversarial, anchored, last step",
          "unanchored": "adversarial, unanchored, last step", "mle": "pg_weight 0 (CE + KL only), last step",
          "onpolicy_kd": "no judge head (on-policy reverse KL), picked by val WER",
          "text_judge": "text-only judge head, picked by val WER",
          "no_reward": "no reward (CE + KL only, no judge head), picked by val WER",
          "mle_pool": "no phase: distill on the train and pool labels",
          "long_inputs": "long inputs drawn more often (length_repeats 8), picked by val WER",
          "summed_reward": "the reward summed, no cost per token taken out (length_neutral false), picked by val WER"}


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


def row(name: str, m: dict, base_wer: float | None, key: str = "wer_vs_reference") -> str:
    wer, ci = m.get(key), m.get(f"{key}_ci")
    rel = "" if base_wer in (None, 0) or wer is None else f"{(wer - base_wer) / base_wer:+.1%}"
    ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (f"| {name} | {fmt(wer)}{ci_s} | {rel} | {fmt(m.get('wer_vs_teacher'))} | {fmt(m.get('distinct_2'))} | "
            f"{fmt(m.get('self_bleu_4'))} | {m.get('rep_5gram', '–')} | {fmt(m.get('disc_accuracy'))} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--reuse", default="runs/demo", help="a finished demo run whose ingest/pseudo_label to reuse")
    ap.add_argument("--greedy-too", action="store_true",
                    help="also score every run with plain greedy decoding (decoding.fallback_temperatures=[]): "
                         "a run OUT/seedS[-name]-greedy that reuses everything but evaluate")
    names = [n for n, _ in ALL_ARMS[1:]]
    ap.add_argument("--arms", nargs="+", default=names,
                    help=f"which arms beside the recipe's own run (default: all): {', '.join(names)}")
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    a = ap.parse_args()
    # `--arms a b key=value` : argparse hands the key=value to --arms (nargs +); they are overrides
    a.overrides += [x for x in a.arms if "=" in x]
    a.arms = [x for x in a.arms if "=" not in x]
    if not a.arms or any(x not in names for x in a.arms):
        ap.error(f"--arms: choose from {', '.join(names)}, got {' '.join(a.arms) or 'none'}")
    global ARMS
    ARMS = [ALL_ARMS[0]] + [(n, o) for n, o in ALL_ARMS[1:] if n in a.arms]
    out = ROOT / a.out
    runs: list[Path] = []
    for seed in a.seeds:
        anchored = out / f"seed{seed}"
        reuse = ["--reuse", a.reuse] if (ROOT / a.reuse).is_dir() else []
        run(["run", str(CONFIG), f"seed={seed}", *a.overrides, "--run-dir", str(anchored), *reuse])
        runs.append(anchored)
        for name, overrides in ARMS[1:]:
            run(["run", str(CONFIG), f"seed={seed}", *overrides, *a.overrides,
                 "--run-dir", str(out / f"seed{seed}-{name}"), "--reuse", str(anchored)])
            runs.append(out / f"seed{seed}-{name}")
        if a.greedy_too:
            for name, overrides in ARMS:
                src = out / (f"seed{seed}" + (f"-{name}" if name else ""))
                run(["run", str(CONFIG), f"seed={seed}", *overrides, *a.overrides,
                     "decoding.fallback_temperatures=[]", "evaluate.temperatures=[0.0]",
                     "--run-dir", str(src.with_name(src.name + "-greedy")), "--reuse", str(src)])

    header = ("| student | {} [95% CI] | vs distilled | WER vs teacher (all clips) | distinct-2 | self-BLEU-4 | 5-gram repeats | "
              "disc accuracy |")
    variants = [("", "wer_vs_reference", "WER vs reference"), ("", "wer_short_form", "short-form WER")]
    if a.greedy_too:
        variants.append(("-greedy", "wer_vs_reference", "WER vs reference, plain greedy"))
    tables = {(v, k): [header.format(title), "|---|---|---:|---:|---:|---:|---:|---:|"] for v, k, title in variants}
    names = [n for n, _ in ARMS]
    images = ["| seed | distilled | " + " | ".join(LABELS[n] for n in names) + " |", "|---|---:|" + "---:|" * len(names)]
    for seed in a.seeds:
        reps = {name: report(out / (f"seed{seed}" + (f"-{name}" if name else "")))["test"] for name in names}
        # each arm's student: its phase's, or distill's where the arm runs no phase (mle_pool)
        ckpt = {n: checkpoint(n, out / (f"seed{seed}" + (f"-{n}" if n else ""))) for n in names}
        for (v, key), lines in tables.items():
            aud = {n: report(out / (f"seed{seed}" + (f"-{n}" if n else "") + v))["test"].get("audio", {})
                   for n in names}
            base = aud[""].get("distill", {}).get(key)
            lines.append(row(f"seed {seed} teacher", aud[""].get("teacher", {}), None, key))
            lines.append(row(f"seed {seed} distilled", aud[""].get("distill", {}), None, key))
            for n in names:
                lines.append(row(f"seed {seed} {LABELS[n]}", aud[n].get(ckpt[n], {}), base, key))
        img = {n: r.get("image", {}) for n, r in reps.items()}
        if img[""]:
            images.append(f"| {seed} | {fmt(img[''].get('distill', {}).get('label_agreement'))} | "
                          + " | ".join(fmt(img[n].get(ckpt[n], {}).get('label_agreement')) for n in names) + " |")
    print("\n## held-out audio (test split): every clip (long ones read chunk by chunk)\n")
    print("\n".join(tables[("", "wer_vs_reference")]))
    print("\n## held-out audio: short-form clips only (<= 30 s)\n")
    print("\n".join(tables[("", "wer_short_form")]))
    if a.greedy_too:
        print("\n## held-out audio, every clip, plain greedy decoding (no temperature fallback)\n")
        print("\n".join(tables[("-greedy", "wer_vs_reference")]))
    print("\n## held-out images: agreement with the teacher's labels\n")
    print("\n".join(images))
    run(["compare", *map(str, runs), "--out", str(out / "compare")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
