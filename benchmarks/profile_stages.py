"""Where a run's minutes go: py-spy's sampled call stacks of `groundgan run`, summed per stage and per call site.

    py-spy record -r 20 --nonblocking -f raw -o run.spy.txt -- python -m pipeline run configs/demo.yaml ...
    python benchmarks/profile_stages.py run.spy.txt [--rate 20] [--json]

py-spy (a sampling profiler, installed outside the project: `pip install --target DIR py-spy`) writes one line
per distinct stack, `frame;frame;... count`, each frame `function (file:line)`. A sample is counted under the
first stage whose `run` function is on its stack, and under the first call site of that stage (below) on its
stack, the innermost one winning where call sites nest (a val check's decoding is counted as decoding, not as the
val check). Seconds are samples / rate: CPU-bound stages only (idle waits are not sampled).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

STAGES = {"ingest": "stages/ingest.py", "pseudo_label": "stages/pseudo_label.py", "distill": "stages/distill.py",
          "adversarial": "stages/adversarial/stage.py", "evaluate": "stages/evaluate.py"}

# (stage, call site, functions that mark it: (function name, file suffix)); the innermost match on a stack wins
SITES = [
    ("distill", "val check: decoding (validate_wer)", [("validate_wer", "stages/distill.py")]),
    ("distill", "val check: teacher-forced loss (validate)", [("validate", "stages/distill.py")]),
    ("distill", "val check: one sample (_val_sample)", [("_val_sample", "stages/distill.py")]),
    ("distill", "checkpoints and best/ (save)", [("save", "pipeline/checkpoint.py"), ("save_student", "stages/models/student.py")]),
    ("distill", "training steps (forward, backward, optimiser)", [("run", "stages/distill.py")]),
    ("adversarial", "val checks: decoding (validate_wer)", [("validate_wer", "stages/distill.py")]),
    ("adversarial", "discriminator pre-training: sampling", [("sample_rows", "stages/adversarial/rows.py@pretrain")]),
    ("adversarial", "discriminator pre-training: steps", [("pretrain_discriminators", "stages/adversarial/judges.py")]),
    ("adversarial", "sampling k per input (sample_rows)", [("sample_rows", "stages/adversarial/rows.py")]),
    ("adversarial", "discriminator steps", [("discriminator_step", "stages/adversarial/judges.py")]),
    ("adversarial", "student loss: rewards (sequence_rewards)", [("sequence_rewards", "stages/adversarial/losses.py")]),
    ("adversarial", "student loss: forward (policy, reference, CE)", [("pg_objective", "stages/adversarial/losses.py")]),
    ("adversarial", "student loss: backward", [("_step", "stages/adversarial/stage.py@backward")]),
    ("adversarial", "setup (models, data)", [("_setup", "stages/adversarial/stage.py")]),
    ("adversarial", "checkpoints, best/, final/", [("save", "pipeline/checkpoint.py"), ("save_student", "stages/models/student.py"),
                                                   ("_finish", "stages/adversarial/stage.py")]),
    ("adversarial", "other", [("run", "stages/adversarial/stage.py")]),
    ("evaluate", "decoding (generate_texts)", [("generate_texts", "stages/evaluate.py")]),
    ("evaluate", "teacher NLL (teacher_nll)", [("teacher_nll", "stages/evaluate.py")]),
    ("evaluate", "discriminator figures", [("disc_accuracy", "stages/evaluate.py"), ("disc_ranking", "stages/evaluate.py")]),
    ("evaluate", "held-out sets (collect_sets)", [("collect_sets", "stages/evaluate.py")]),
    ("evaluate", "scoring and report", [("score", "stages/evaluate.py"), ("write_report", "stages/evaluation/report.py"),
                                        ("vs_distill", "stages/evaluate.py")]),
    ("evaluate", "other", [("run", "stages/evaluate.py")]),
]

FRAME = re.compile(r"^(?P<fn>[^ ]+) \((?P<file>[^:]+):(?P<line>\d+)\)$")


def parse(path: str):
    """(frames [(function, file)], count) per line of py-spy's raw output."""
    with open(path) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            frames = []
            for fr in stack.split(";"):
                m = FRAME.match(fr.strip())
                if m:
                    frames.append((m["fn"], m["file"]))
            yield frames, int(n)


def _matches(frame, fn: str, suffix: str) -> bool:
    return frame[0] == fn and frame[1].endswith(suffix.split("@")[0])


def classify(frames) -> tuple[str | None, str | None]:
    stage = None
    for f in frames:
        for s, suffix in STAGES.items():
            if f[0] == "run" and f[1].endswith(suffix):
                stage = s
                break
        if stage:
            break
    if stage is None:
        return None, None
    best, depth = None, -1
    for st, site, marks in SITES:
        if st != stage:
            continue
        for fn, suffix in marks:
            for d, f in enumerate(frames):
                if not _matches(f, fn, suffix):
                    continue
                if suffix.endswith("@pretrain") and not any(g[0] == "pretrain_discriminators" for g in frames):
                    continue
                if suffix.endswith("@backward") and not any(g[0] == "backward" for g in frames[d:]):
                    continue
                if d > depth or (d == depth and "@" in suffix):
                    best, depth = site, d
    return stage, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spy", help="py-spy record -f raw output")
    ap.add_argument("--rate", type=float, default=20.0, help="py-spy's sampling rate (-r)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    per_stage: dict[str, float] = defaultdict(float)
    per_site: dict[tuple[str, str], float] = defaultdict(float)
    total = 0.0
    for frames, n in parse(a.spy):
        total += n
        stage, site = classify(frames)
        if stage is None:
            continue
        per_stage[stage] += n
        per_site[(stage, site or "other")] += n
    sec = lambda n: n / a.rate  # noqa: E731
    if a.json:
        print(json.dumps({"total_s": sec(total), "stages": {s: sec(v) for s, v in per_stage.items()},
                          "sites": {f"{s}: {c}": sec(v) for (s, c), v in per_site.items()}}, indent=2))
        return 0
    print(f"sampled {sec(total):.0f} s in all")
    print("| stage | call site | s | share of the stage |")
    print("| --- | --- | --- | --- |")
    for s in STAGES:
        if s not in per_stage:
            continue
        print(f"| {s} | (all) | {sec(per_stage[s]):.0f} | |")
        for (st, site), v in sorted(per_site.items(), key=lambda kv: -kv[1]):
            if st == s:
                print(f"| | {site} | {sec(v):.0f} | {v / per_stage[s]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
