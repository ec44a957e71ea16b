"""Is the discriminators' reward worth more than what the student already knows?

    .venv/bin/python benchmarks/reward_signal.py RUN [--splits val test] [--k 8] [--temperature 1.0] [--teacher]
                                                   [--modalities audio image]

RUN is a run directory whose adversarial stage has finished (its discriminators in adversarial/final). For every
input of a judged modality in the pseudo_label stage's splits (default val and test: held out; `--splits pool`
reads the inputs the phase trained on; long clips in the chunks the teacher labelled), the distilled student
(RUN/distill/final) draws K samples; each scorer ranks them, and the figure is the fraction of sample pairs of one
input, among those whose errors differ, that the scorer puts in the right order (text_metrics.pair_order_accuracy;
0.5 is a coin). Errors against the teacher's label and against the reference where the input has one: for a
transcript modality the word errors; for a captioning one (drawings) whether the sample names the teacher's label
and whether it names the reference category, by the modality's own metrics (evaluate's label and category
agreement), so a pair differs when one sample is right and the other wrong. Scorers:
- `disc/<modality>`: the discriminator's sequence score (Discriminator.sequence_scores), the judge's part of the
  phase's reward; `head/<modality>`: its learned head's part alone (Discriminator.head_scores: without the frozen
  body's likelihood, which starts as the student's own);
- `student_logprob`: the distilled student's own log-probability of the sample (what likelihood training
  already gives it: a reward that orders samples no better than this has nothing to teach it);
- `teacher_score` (drawings): the teacher's own score of the sample (Teacher.caption_scores: the CLIP-style
  teacher's zero-shot log-probability of the caption), what `adversarial.teacher_score_weight` adds;
- `reward`: the discriminator's score less the student's log-probability (plus the run's teacher_score_weight times
  the teacher score where it set one), as the phase rewards a sample;
- `teacher_mean_logprob` (--teacher, Whisper teachers): the teacher decoder's mean log-prob per token.
A policy gradient can only move the student toward what its reward prefers: a reward below `student_logprob`
here is noise to a student that has it already. A second table is the judge's own task on the same inputs: how
often each scorer puts the teacher's label above a sample that differs from it (the discriminator was trained
to tell them apart on the phase's inputs; on held-out ones 0.5 is a coin). For a captioning modality a third
table reads what the judge rewards by the text a sample is (templated captions are few: one per label): how
often the teacher's labels and the student's samples are that text, and the head's mean score of the samples that
are, with the rank correlation between that score and log(teacher share / sample share) over the texts with at
least 5 samples (a judge that rewards what the teacher writes more often than the student, whatever the input,
correlates). Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.registry import modality_adapter  # noqa: E402
from stages import adversarial as adv  # noqa: E402
from stages.adversarial.teacher_scores import TeacherScores  # noqa: E402
from stages.evaluation import text_metrics as tm  # noqa: E402
from stages.evaluation.text_metrics import transcribes  # noqa: E402
from stages.models.labelled_data import Example, load_labelled  # noqa: E402
from stages.models.student import load_student  # noqa: E402


def sequence_logprob(model, rows: adv.Rows, mean: bool = False) -> torch.Tensor:
    lp = adv.policy_logprobs(model, rows).gather(-1, rows.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = rows.attention_mask[:, 1:].to(lp.dtype)
    total = (lp * m).sum(1)
    return total / m.sum(1).clamp_min(1.0) if mean else total


def sample_errors(adapter, e: Example, texts: list[str]) -> dict[str, list]:
    """Each sample's errors against the teacher's label and against the reference: word errors for a transcript,
    0 or 1 for a caption (names the teacher's label / the reference category, by the adapter's metrics; None
    where the input has no reference)."""
    out = {}
    if transcribes(e.modality):
        for against, ref in (("teacher label", e.text), ("reference", e.reference)):
            if ref:
                a = tm.align(texts, [ref] * len(texts))
                if a.n == len(texts):  # else the reference normalises to nothing
                    out[against] = list(a.errors)
        return out
    for against, key in (("teacher label", "label_agreement"), ("reference", "category_agreement")):
        errs = []
        for t in texts:
            v = adapter.metrics([t], [e.text], [e.reference], [{}]).get(key)
            errs.append(None if v is None else int(v < 1))
        if any(x is not None for x in errs):
            out[against] = errs
    return out


def caption_key(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def text_table(seen: dict, modality: str, min_samples: int = 5) -> dict:
    """Print and return, per text, the teacher's and the samples' shares and the head's mean score of its samples;
    and the rank correlation (Spearman) of that score with log(teacher share / sample share)."""
    teacher, samples = seen["teacher"], seen["samples"]
    heads: dict[str, list[float]] = {}
    for t, h in samples:
        heads.setdefault(t, []).append(h)
    rows = []
    print(f"\n| {modality}: text | teacher's labels | student's samples | head's mean score |")
    print("|---|---:|---:|---:|")
    for t in sorted(heads, key=lambda t: -len(heads[t])):
        share_t, share_s = teacher.count(t) / len(teacher), len(heads[t]) / len(samples)
        mean = float(np.mean(heads[t]))
        print(f"| {t} | {share_t:.3f} | {share_s:.3f} | {mean:+.3f} |")
        if len(heads[t]) >= min_samples and share_t > 0:
            rows.append((mean, math.log(share_t / share_s)))
    rho = None
    if len(rows) >= 3:
        a = np.argsort(np.argsort([r[0] for r in rows]))
        b = np.argsort(np.argsort([r[1] for r in rows]))
        rho = float(np.corrcoef(a, b)[0, 1])
    print(f"rank correlation of the head's mean score with log(teacher share / sample share), {len(rows)} texts: "
          f"{'-' if rho is None else f'{rho:+.2f}'}")
    return {"texts": len(heads), "correlated_texts": len(rows), "spearman_head_vs_share_ratio": rho}


def score_rows(rows, texts, modality, student, discs, scores_of, reward_weight, teacher=None) -> dict[str, list]:
    d = discs[modality].eval()
    scores = {f"disc/{modality}": d.sequence_scores(rows.input_ids, rows.attention_mask, rows.features).tolist(),
              f"head/{modality}": d.head_scores(rows.input_ids, rows.attention_mask, rows.features).tolist(),
              "student_logprob": sequence_logprob(student, rows).tolist()}
    reward = [j - lp for j, lp in zip(scores[f"disc/{modality}"], scores["student_logprob"])]
    if modality in scores_of.teachers:
        scores["teacher_score"] = scores_of(rows, texts)[0].tolist()
        if reward_weight > 0:  # the phase adds it (TeacherScores scaled by the run's weight)
            reward = [r + reward_weight * s for r, s in zip(reward, scores["teacher_score"])]
    scores["reward"] = reward  # as the phase computes it
    if teacher is not None and transcribes(modality):
        scores["teacher_mean_logprob"] = sequence_logprob(teacher, rows, mean=True).tolist()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--modalities", nargs="+", default=None, help="default: every modality with a discriminator")
    ap.add_argument("--k", type=int, default=8, help="samples per input")
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
    mods = [m for m in (args.modalities or student.spec.modalities) if m in discs]
    if not mods:
        sys.exit(f"reward_signal: no discriminator in {run}/adversarial/final judges {args.modalities}")
    adapters = {m: modality_adapter(cfg.root, m) for m in mods}
    # the teacher score as a scorer (weight 1); the phase's reward adds it only at the run's own weight
    scores_of = TeacherScores.build([m for m in mods if not transcribes(m)], adapters.get, "cpu", 1.0)
    reward_weight = float(cfg.root.adversarial.teacher_score_weight or 0) if cfg.root.adversarial.anchored else 0.0
    teacher = None
    if args.teacher:
        audio = [m for m in mods if transcribes(m)]
        teacher = adv._teacher_body_builder(SimpleNamespace(cfg=cfg), student, audio, "cpu")[0]().eval()
    data = load_labelled(run / "pseudo_label", student.tokenizer, cfg.root.distill.max_text_tokens,
                         splits=tuple(args.splits), modalities=mods)
    max_new = cfg.root.adversarial.max_new_tokens
    bos, eot = student.spec.bos_id, student.spec.eot_id
    for split in args.splits:
        groups: dict[tuple[str, str, str], list] = {}
        label_first: dict[tuple[str, str], list[float]] = {}
        n_inputs: dict[str, int] = {}
        texts_seen: dict[str, dict] = {}  # captioning modality -> {"teacher": [...], "samples": [(text, head)]}
        for i, e in enumerate(data.splits[split]):
            if e.modality not in mods:
                continue
            n_inputs[e.modality] = n_inputs.get(e.modality, 0) + 1
            g = torch.Generator().manual_seed(adv.stream_seed("reward_signal", args.seed, split, i))
            with torch.no_grad():
                rows, texts = adv.sample_rows(student, [e], args.k, [g], args.temperature, max_new, "cpu")
                scores = score_rows(rows, texts, e.modality, student, discs, scores_of, reward_weight, teacher)
                label = adv.rows_from_tokens([e.targets], [e.modality], [rows.features[0]], [0], bos, eot, "cpu")
                label_scores = score_rows(label, [e.text], e.modality, student, discs, scores_of, reward_weight,
                                          teacher)
            for against, errors in sample_errors(adapters[e.modality], e, texts).items():
                for name, sc in scores.items():
                    groups.setdefault((e.modality, against, name), []).append((sc, errors))
            if not transcribes(e.modality):
                seen = texts_seen.setdefault(e.modality, {"teacher": [], "samples": []})
                seen["teacher"].append(caption_key(e.text))
                seen["samples"].extend(zip(map(caption_key, texts), scores[f"head/{e.modality}"]))
            differ = [j for j, t in enumerate(texts) if caption_key(t) != caption_key(e.text)]
            for name, sc in scores.items():
                label_first.setdefault((e.modality, name), []).extend(
                    1.0 if label_scores[name][0] > sc[j] else 0.5 if label_scores[name][0] == sc[j] else 0.0
                    for j in differ)
        counts = ", ".join(f"{n} {m} inputs" for m, n in sorted(n_inputs.items()))
        print(f"\n{run.name} / {split}: {counts}, {args.k} samples each at temperature {args.temperature}")
        print("| modality | errors against | scorer | pairs | in order |")
        print("|---|---|---|---:|---:|")
        out, pairs = {}, {}
        for (m, against, name), gs in groups.items():
            acc, n = tm.pair_order_accuracy(gs)
            out[f"{m}:{against}:{name}"], pairs[f"{m}:{against}:{name}"] = acc, n
            print(f"| {m} | {against} | {name} | {n} | {'-' if acc is None else f'{acc:.3f}'} |")
        print("\n| modality | scorer | samples unlike the label | label scored higher |")
        print("|---|---|---:|---:|")
        above, unlike = {}, {}
        for (m, name), hits in label_first.items():
            above[f"{m}:{name}"], unlike[f"{m}:{name}"] = (sum(hits) / len(hits) if hits else None), len(hits)
            print(f"| {m} | {name} | {len(hits)} | {'-' if not hits else f'{sum(hits) / len(hits):.3f}'} |")
        by_text = {m: text_table(t, m) for m, t in texts_seen.items()}
        print(json.dumps({"run": str(run), "split": split, "in_order": out, "pairs": pairs,
                          "label_above_sample": above, "samples_unlike_label": unlike, "by_text": by_text}))


if __name__ == "__main__":
    main()
