"""Is the discriminators' reward worth more than what the student already knows?

    .venv/bin/python benchmarks/reward_signal.py RUN [--splits val test] [--k 8] [--temperature 1.0] [--teacher]

RUN is a run directory whose adversarial stage has finished (its discriminators in adversarial/final). For every
held-out clip of a transcript modality (the pseudo_label stage's val and test splits, long clips in the chunks
the teacher labelled), the distilled student (RUN/distill/final) draws K samples; each scorer ranks them, and
the figure is the fraction of sample pairs of one clip, among those whose word errors differ, that the scorer
puts in the right order (text_metrics.pair_order_accuracy; 0.5 is a coin). Errors are counted against the
teacher's label and, where the clip has one, against the reference transcript. Scorers:
- `disc/<modality>`: the discriminator's sequence score (Discriminator.sequence_scores), the judge's part of the
  phase's reward;
- `student_logprob`: the distilled student's own log-probability of the sample (what likelihood training
  already gives it: a reward that orders samples no better than this has nothing to teach it);
- `reward`: the discriminator's score less the student's log-probability, as the phase rewards a sample;
- `teacher_mean_logprob` (--teacher, Whisper teachers): the teacher decoder's mean log-prob per token.
A policy gradient can only move the student toward what its reward prefers: a reward below `student_logprob`
here is noise to a student that has it already. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from stages import adversarial as adv  # noqa: E402
from stages.evaluation import text_metrics as tm  # noqa: E402
from stages.evaluation.text_metrics import transcribes  # noqa: E402
from stages.models.labelled_data import load_labelled  # noqa: E402
from stages.models.student import load_student  # noqa: E402


def sequence_logprob(model, rows: adv.Rows, mean: bool = False) -> torch.Tensor:
    lp = adv.policy_logprobs(model, rows).gather(-1, rows.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = rows.attention_mask[:, 1:].to(lp.dtype)
    total = (lp * m).sum(1)
    return total / m.sum(1).clamp_min(1.0) if mean else total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--k", type=int, default=8, help="samples per clip")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", action="store_true", help="score with the Whisper teacher's decoder too")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = args.run
    for need in ("config.yaml", "distill/final", "adversarial/final/discriminators", "pseudo_label"):
        if not (run / need).exists():
            sys.exit(f"reward_signal: {run / need} is missing (a run whose adversarial stage finished is needed)")
    cfg = load_config([str(run / "config.yaml")], [])
    student = load_student(run / "distill" / "final").eval()
    discs = adv.load_discriminators(run / "adversarial" / "final")
    mods = [m for m in student.spec.modalities if transcribes(m)]
    teacher = None
    if args.teacher:
        teacher = adv._teacher_body_builder(SimpleNamespace(cfg=cfg), student, mods, "cpu")[0]().eval()
    data = load_labelled(run / "pseudo_label", student.tokenizer, cfg.root.distill.max_text_tokens,
                         splits=tuple(args.splits), modalities=mods)
    max_new = cfg.root.adversarial.max_new_tokens
    for split in args.splits:
        groups: dict[tuple[str, str], list] = {}
        n_inputs = 0
        for i, e in enumerate(data.splits[split]):
            if e.modality not in discs:
                continue
            n_inputs += 1
            g = torch.Generator().manual_seed(adv.stream_seed("reward_signal", args.seed, split, i))
            with torch.no_grad():
                rows, texts = adv.sample_rows(student, [e], args.k, [g], args.temperature, max_new, "cpu")
                scores = {f"disc/{e.modality}": discs[e.modality].eval().sequence_scores(
                    rows.input_ids, rows.attention_mask, rows.features).tolist(),
                    "student_logprob": sequence_logprob(student, rows).tolist()}
                # the reward as the phase computes it
                scores["reward"] = [d - lp for d, lp in zip(scores[f"disc/{e.modality}"], scores["student_logprob"])]
                if teacher is not None:
                    scores["teacher_mean_logprob"] = sequence_logprob(teacher, rows, mean=True).tolist()
            for against, ref in (("teacher label", e.text), ("reference", e.reference)):
                if not ref:
                    continue
                a = tm.align(texts, [ref] * len(texts))
                if a.n != len(texts):  # the reference normalises to nothing
                    continue
                for name, sc in scores.items():
                    groups.setdefault((against, name), []).append((sc, a.errors))
        print(f"\n{run.name} / {split}: {n_inputs} clips, {args.k} samples each at temperature {args.temperature}")
        print("| errors against | scorer | pairs | in order |")
        print("|---|---|---:|---:|")
        out = {}
        for (against, name), gs in groups.items():
            acc, n = tm.pair_order_accuracy(gs)
            out[f"{against}:{name}"] = acc
            print(f"| {against} | {name} | {n} | {'-' if acc is None else f'{acc:.3f}'} |")
        print(json.dumps({"run": str(run), "split": split, "in_order": out}))


if __name__ == "__main__":
    main()
