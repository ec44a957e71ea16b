"""[Grounding proof]'s table: every arm x seed of `benchmarks/demo_ablation.py`'s runs, pooled over seeds, with the
issue's acceptance lines checked one by one.

    .venv/bin/python benchmarks/ablation_summary.py [--out runs/ablation] [--seeds 0 1 2 3]
        [--arms onpolicy_kd text_judge unanchored] [--json FILE]

Reads what the runs already wrote (nothing is re-run or re-scored by a model): OUT/seedS/evaluate/predictions.jsonl
holds the distilled student (`distill`) and the recipe (`adversarial`, called `grounded` here) on the held-out
split; OUT/seedS-ARM/evaluate/predictions.jsonl each arm's adversarial student (its distilled one where the arm
runs no phase, as configs/arms/mle_pool.yaml); evaluate/generations/ the
temperature sweep; report.json the drawings' agreement; run.log each stage's wall time.

Per seed, each arm's word errors against the human reference and their paired change against `distilled` and
against `onpolicy_kd` (95% paired bootstrap, text_metrics.paired_change). Pooled: errors summed over seeds, and the
bootstrap draws held-out *clips* (the same draw for every seed and both systems), so a clip that is hard on every
seed is not counted as independent evidence four times. Output length: words of each output over the words of its
teacher label (normalised text), the largest per arm. Errors by the reference's length (1-12, 13-40, 41+ words),
summed over seeds. Sweep: each temperature's WER against the teacher (errors
summed over seeds), `distilled` and `grounded`. Distinct-2 is each seed's own, averaged over seeds (n-grams never
pool across seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.files import read_jsonl  # noqa: E402
from stages.evaluation import text_metrics as tm  # noqa: E402

N_BOOT = 2000
# the held-out clips by their reference's words: the students' errors sit in the few long prompts (docs/results.md)
LENGTH_BUCKETS = (("1-12", 1, 12), ("13-40", 13, 40), ("41+", 41, 10 ** 9))


def run_dir(out: Path, seed: int, arm: str) -> Path:
    return out / (f"seed{seed}" if arm in ("distilled", "grounded") else f"seed{seed}-{arm}")


def checkpoint(arm: str, run: Path | None = None) -> str:
    """The checkpoint an arm is read at: its phase's student, or distill's where the arm's run has no phase
    (adversarial.enabled false, as configs/arms/mle_pool.yaml: evaluate then scores distill alone)."""
    if arm == "distilled":
        return "distill"
    if run is not None and (run / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        if (cfg.get("adversarial") or {}).get("enabled") is False:
            return "distill"
    return "adversarial"


def load_outputs(out: Path, seeds: list[int], arms: list[str], modality: str = "audio") -> tuple[list[str], dict]:
    """The held-out keys every run scored, and per (seed, arm) {key: output}, plus per seed {key: (reference,
    teacher)}. A key missing from any run is left out of every comparison (the same clips everywhere)."""
    texts: dict = {}
    refs: dict = {}
    for seed in seeds:
        for arm in arms:
            path = run_dir(out, seed, arm) / "evaluate" / "predictions.jsonl"
            if not path.is_file():
                raise SystemExit(f"{path}: missing (run benchmarks/demo_ablation.py --seeds {seed} first)")
            rows = [r for r in read_jsonl(path) if r.get("set") == "test" and r.get("modality") == modality]
            ckpt = checkpoint(arm, run_dir(out, seed, arm))
            if rows and ckpt not in rows[0]["outputs"]:
                raise SystemExit(f"{path}: no '{ckpt}' outputs (it has {', '.join(rows[0]['outputs'])})")
            texts[seed, arm] = {r["key"]: r["outputs"].get(ckpt) for r in rows}
            if arm == "distilled":
                refs[seed] = {r["key"]: (r.get("reference"), r.get("teacher")) for r in rows}
    keys = sorted(set.intersection(*(set(v) for v in texts.values())))
    return keys, {"texts": texts, "refs": refs}


def image_scores(out: Path, seeds: list[int], arms: list[str]) -> tuple[list[str], dict]:
    """Held-out drawings every run captioned, and per (seed, arm) two arrays over them: does the caption name the
    teacher's label (label agreement), and does the label it names map to the drawing's category (category
    agreement): modalities.image's own definitions, per drawing; plus each arm's captions and the teacher's."""
    import yaml

    from modalities.image import _contains, label_in_caption, map_labels_to_categories

    cfg = yaml.safe_load((run_dir(out, seeds[0], "distilled") / "config.yaml").read_text())["modalities"]["image"]
    template, categories = cfg.get("caption", "{label}"), list(cfg.get("categories") or [])
    keys, data = load_outputs(out, seeds, arms, modality="image")
    named = {sa: [label_in_caption(t[k] or "", template) for k in keys] for sa, t in data["texts"].items()}
    refs = {s: [data["refs"][s][k][0] for k in keys] for s in seeds}
    mapping = map_labels_to_categories(sorted({n for v in named.values() for n in v}),
                                       categories or sorted({r for v in refs.values() for r in v if r}))
    scores = {}
    for (seed, arm), names in named.items():
        teacher = [label_in_caption(data["refs"][seed][k][1] or "", template) for k in keys]
        scores[seed, arm] = {
            "label": np.array([_contains(data["texts"][seed, arm][k] or "", t) for k, t in zip(keys, teacher)], float),
            "category": np.array([mapping.get(n) == r for n, r in zip(names, refs[seed])], float),
            "captions": [data["texts"][seed, arm][k] for k in keys],
            "teacher": [data["refs"][seed][k][1] for k in keys]}
    return keys, scores


def paired_rate(base: np.ndarray, new: np.ndarray, seed: int = 0) -> dict:
    """Change in a per-item rate (new - base, absolute), 95% bootstrap over items (axis 0; [items, seeds] takes
    every seed's row of a drawn item)."""
    base, new = base.reshape(len(base), -1), new.reshape(len(new), -1)
    idx = np.random.default_rng(seed).integers(0, len(base), size=(N_BOOT, len(base)))
    d = (new.sum(axis=1) - base.sum(axis=1)) / base.shape[1]
    diffs = d[idx].mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"base": float(base.mean()), "new": float(new.mean()), "change": float(d.mean()), "ci": [float(lo), float(hi)]}


def errors(hyps: list, refs: list) -> tuple[np.ndarray, np.ndarray]:
    """Per clip (errors, reference words), 0/0 for a clip whose reference normalises to nothing."""
    a = tm.align(hyps, refs)
    e, w = np.zeros(len(hyps)), np.zeros(len(hyps))
    e[a.kept], w[a.kept] = a.errors, a.ref_words
    return e, w


def paired(eb: np.ndarray, en: np.ndarray, words: np.ndarray) -> dict:
    """text_metrics.paired_change of two systems' errors, eb and en [clips, seeds], against `words` [clips] (each
    clip's reference words summed over the same seeds): a bootstrap draw takes whole clips, every seed's row of a
    drawn clip with it. Adds the summed errors of both."""
    ch = tm.paired_change(np.stack([eb.sum(axis=1), words], axis=1), np.stack([en.sum(axis=1), words], axis=1),
                          n=N_BOOT)
    return {**ch, "errors_base": int(eb.sum()), "errors_new": int(en.sum())}


def distinct_paired(base: list[list[str]], new: list[list[str]], seed: int = 0) -> dict:
    """Change in distinct-2 (new - base), each seed's distinct-2 averaged over seeds (n-grams never pool across
    seeds: two seeds writing the same caption is not a lack of diversity), 95% bootstrap over clips: base/new
    are per seed the outputs in key order; a drawn clip brings its output from every seed."""
    grams = [[[tm.ngrams(tm.words(t), 2) for t in side_seed] for side_seed in side] for side in (base, new)]
    n = len(base[0])

    def change(draw) -> float | None:
        diffs = []
        for s in range(len(base)):
            vals = [tm._pooled_distinct(g[s][i] for i in draw) for g in grams]
            if None in vals:
                return None
            diffs.append(vals[1] - vals[0])
        return float(np.mean(diffs))

    idx = np.random.default_rng(seed).integers(0, n, size=(N_BOOT // 4, n))
    diffs = [d for d in (change(draw) for draw in idx) if d is not None]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"change": change(range(n)), "ci": [float(lo), float(hi)]}


def sweep(out: Path, seeds: list[int], arm: str, refs_by_seed: dict, modality: str = "audio") -> dict[str, dict]:
    """Per temperature: WER against the teacher's label pooled over seeds (errors summed) and distinct-2 (each
    seed's, averaged), from evaluate/generations/test/MODALITY/CHECKPOINT/T*.json; refs_by_seed: load_outputs'
    {seed: {key: (reference, teacher label)}}."""
    per_t: dict[str, dict] = {}
    for seed in seeds:
        d = run_dir(out, seed, arm) / "evaluate"
        for f in sorted((d / "generations" / "test" / modality / checkpoint(arm, d.parent)).glob("T*.json")):
            g = json.loads(f.read_text())
            hyps = list(g["texts"])
            refs = [refs_by_seed[seed].get(k, (None, None))[1] for k in g["keys"]]
            e, w = errors(hyps, refs)
            t = per_t.setdefault(f.stem[1:], {"errors": 0.0, "words": 0.0, "distinct": []})
            t["errors"] += e.sum()
            t["words"] += w.sum()
            t["distinct"].append(tm.distinct_n(hyps, 2))
    return {t: {"wer_vs_teacher": v["errors"] / v["words"] if v["words"] else None,
                "distinct_2": float(np.mean(v["distinct"]))} for t, v in sorted(per_t.items(), key=lambda x: float(x[0]))}


def length_ratios(keys: list[str], data: dict, seeds: list[int], arm: str) -> tuple[float, list]:
    """The largest words(output) / words(teacher label) over seeds and clips, and every output over twice its
    label's words as (seed, key, output words, label words)."""
    worst, over = 0.0, []
    for seed in seeds:
        for k in keys:
            out_w = len(tm.normalize(data["texts"][seed, arm][k]).split())
            lab_w = len(tm.normalize(data["refs"][seed][k][1]).split())
            r = out_w / max(lab_w, 1)
            worst = max(worst, r)
            if out_w > 2 * lab_w:
                over.append((seed, k, out_w, lab_w))
    return worst, over


def wall_times(out: Path, seed: int, arm: str) -> dict[str, float]:
    """Each stage's last 'finished in Xs' in the run's run.log (stages a run reused are not in it)."""
    log = run_dir(out, seed, arm) / "run.log"
    times: dict[str, float] = {}
    if log.is_file():
        for m in re.finditer(r"^(\w+): finished in ([0-9.]+)s", log.read_text(), re.M):
            times[m.group(1)] = float(m.group(2))
    return times


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def ci(d: dict) -> str:
    return f"{pct(d['change'])} [{pct(d['ci'][0])}, {pct(d['ci'][1])}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--arms", nargs="*", default=["onpolicy_kd", "text_judge", "unanchored"])
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args()
    out = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    arms = ["distilled", "grounded", *a.arms]
    keys, data = load_outputs(out, a.seeds, arms)
    seeds = a.seeds
    err, words = {}, {}  # per (seed, arm) and per seed: each clip's errors, its reference words
    for seed in seeds:
        refs = [data["refs"][seed][k][0] for k in keys]
        for arm in arms:
            err[seed, arm], words[seed] = errors([data["texts"][seed, arm][k] for k in keys], refs)
    res: dict = {"seeds": seeds, "clips": len(keys), "per_seed": {}, "pooled": {}}
    bases = [b for b in ("distilled", "onpolicy_kd", "grounded") if b in arms]
    print(f"## Held-out audio, {len(keys)} clips, seeds {' '.join(map(str, seeds))}: WER against the reference, "
          "and the paired change in word errors [95%]\n")
    head = "| seed | " + " | ".join(arms) + " |"
    lines = [head, "|---" * (len(arms) + 1) + "|"]
    for seed in seeds + ["pooled"]:
        ss = seeds if seed == "pooled" else [seed]
        e = {arm: np.stack([err[s, arm] for s in ss], axis=1) for arm in arms}
        w = sum(words[s] for s in ss)
        wer = {arm: e[arm].sum() / w.sum() for arm in arms}
        rec = res["pooled"] if seed == "pooled" else res["per_seed"].setdefault(str(seed), {})
        rec["wer"] = {arm: float(v) for arm, v in wer.items()}
        lines.append(f"| {seed}: WER | " + " | ".join(f"{100 * wer[arm]:.1f}%" for arm in arms) + " |")
        for base in bases:
            ch = {arm: paired(e[base], e[arm], w) for arm in arms
                  if arm != base and arm != "distilled" and not (base == "grounded" and arm == "onpolicy_kd")}
            rec[f"vs_{base}"] = ch
            lines.append(f"| {seed}: vs {base} | " + " | ".join(ci(ch[arm]) if arm in ch else "" for arm in arms) + " |")
    print("\n".join(lines))

    # distinct-2, grounded vs distilled
    per_seed_texts = {arm: [[data["texts"][s, arm][k] for k in keys] for s in seeds] for arm in ("distilled", "grounded")}
    d2 = {str(s): distinct_paired([per_seed_texts["distilled"][i]], [per_seed_texts["grounded"][i]])
          for i, s in enumerate(seeds)}
    d2["pooled"] = distinct_paired(per_seed_texts["distilled"], per_seed_texts["grounded"])
    res["distinct_2_grounded_vs_distilled"] = d2
    print("\n## distinct-2, grounded - distilled [95% paired]\n")
    print("| seed | change |\n|---|---|")
    for s, d in d2.items():
        print(f"| {s} | {d['change']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] |")

    print("\n## Output length: words of an output / words of its teacher label (normalised), audio\n")
    print("| arm | largest ratio | outputs over 2x (of seeds x clips) |\n|---|---|---|")
    res["length"] = {}
    for arm in arms:
        worst, over = length_ratios(keys, data, seeds, arm)
        res["length"][arm] = {"max_ratio": worst, "over_2x": over}
        shown = "; ".join(f"seed {s} {k} {o}/{l}" for s, k, o, l in over[:4]) + (" ..." if len(over) > 4 else "")
        print(f"| {arm} | {worst:.2f} | {len(over)} of {len(seeds) * len(keys)}{': ' + shown if over else ''} |")

    print("\n## Held-out errors by the reference's length (words), summed over seeds: errors / reference words\n")
    res["by_length"] = {}
    ref_words = np.stack([words[s] for s in seeds], axis=1)  # the same reference on every seed
    print("| reference words | clips | " + " | ".join(arms) + " |\n" + "|---" * (len(arms) + 2) + "|")
    for name, lo, hi in LENGTH_BUCKETS:
        inb = (ref_words[:, 0] >= lo) & (ref_words[:, 0] <= hi)
        w = ref_words[inb].sum()
        row = {arm: int(np.stack([err[s, arm] for s in seeds], axis=1)[inb].sum()) for arm in arms}
        res["by_length"][name] = {"clips": int(inb.sum()), "words": int(w), "errors": row}
        print(f"| {name} | {int(inb.sum())} | " + " | ".join(
            f"{row[arm]} / {int(w)} ({100 * row[arm] / max(w, 1):.1f}%)" for arm in arms) + " |")

    print("\n## Temperature sweep, pooled over seeds: WER against the teacher's label / distinct-2\n")
    sw = {arm: sweep(out, seeds, arm, data["refs"]) for arm in ("distilled", "grounded")}
    res["sweep"] = sw
    print("| T | distilled | grounded | WER no higher | distinct-2 no lower |\n|---|---|---|---|---|")
    for t in sw["distilled"]:
        d, g = sw["distilled"][t], sw["grounded"].get(t, {})
        print(f"| {t} | {100 * d['wer_vs_teacher']:.1f}% / {d['distinct_2']:.3f} | "
              f"{100 * g['wer_vs_teacher']:.1f}% / {g['distinct_2']:.3f} | "
              f"{'yes' if g['wer_vs_teacher'] <= d['wer_vs_teacher'] else 'no'} | "
              f"{'yes' if g['distinct_2'] >= d['distinct_2'] else 'no'} |")

    print("\n## Drawings (held out): agreement with the teacher's label / category agreement, and the paired change "
          "of each against distilled [95%, absolute]\n")
    ikeys, isc = image_scores(out, seeds, arms)
    res["images"] = {"drawings": len(ikeys)}
    print(f"{len(ikeys)} drawings per seed.\n")
    print("| seed | " + " | ".join(arms) + " |\n" + "|---" * (len(arms) + 1) + "|")
    for seed in seeds + ["pooled"]:
        ss = seeds if seed == "pooled" else [seed]
        st = {arm: {m: np.stack([isc[s, arm][m] for s in ss], axis=1) for m in ("label", "category")} for arm in arms}
        rec = res["images"].setdefault(str(seed), {})
        cells, ch_cells = [], []
        for arm in arms:
            rec[arm] = {m: float(st[arm][m].mean()) for m in ("label", "category")}
            cells.append(f"{rec[arm]['label']:.3f} / {rec[arm]['category']:.3f}")
            if arm != "distilled":
                ch = {m: paired_rate(st["distilled"][m], st[arm][m]) for m in ("label", "category")}
                rec[arm]["vs_distilled"] = ch
                ch_cells.append(" / ".join(f"{c['change']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
                                           for c in ch.values()))
            else:
                ch_cells.append("")
        print(f"| {seed} | " + " | ".join(cells) + " |")
        print(f"| {seed}: vs distilled | " + " | ".join(ch_cells) + " |")
    def mean_d2(arm, field="captions"):
        vals = [tm.distinct_n(isc[s, arm][field], 2) for s in seeds]
        return None if None in vals else float(np.mean(vals))

    img_d2 = {arm: mean_d2(arm) for arm in arms}
    img_d2["teacher"] = mean_d2("distilled", "teacher")
    res["images"]["distinct_2"] = img_d2
    print("\ndistinct-2 of the captions (each seed's, averaged): " + ", ".join(
        f"{k} {v:.3f}" if v is not None else f"{k} –" for k, v in img_d2.items()))

    print("\n## Wall time (s): distill (its seed's recipe run), and each arm's adversarial + evaluate\n")
    print("| seed | distill | " + " | ".join(a_ for a_ in arms[1:]) + " |\n" + "|---" * (len(arms) + 1) + "|")
    res["wall_s"] = {}
    for seed in seeds:
        t = {arm: wall_times(out, seed, arm) for arm in arms[1:]}
        res["wall_s"][str(seed)] = t
        def sec(x):
            return "–" if x is None else f"{x:.0f}"

        print(f"| {seed} | {sec(t['grounded'].get('distill'))} | " + " | ".join(
            f"{sec(t[arm].get('adversarial'))} + {sec(t[arm].get('evaluate'))}" for arm in arms[1:]) + " |")

    # the acceptance lines
    P = res["pooled"]
    checks = []
    every = all(res["per_seed"][str(s)]["vs_distilled"]["grounded"]["ci"][1] < 0 for s in seeds)
    checks.append(("grounded vs distilled: every seed's interval below zero", every))
    checks.append((f"grounded vs distilled: >= 15% fewer pooled ({pct(P['vs_distilled']['grounded']['change'])})",
                   P["vs_distilled"]["grounded"]["change"] <= -0.15))
    checks.append(("distinct-2 change's pooled interval not wholly below zero", d2["pooled"]["ci"][1] >= 0))
    checks.append(("no output of any arm over 2x its teacher label's words",
                   all(not v["over_2x"] for v in res["length"].values())))
    if "onpolicy_kd" in arms:
        c = P["vs_onpolicy_kd"]["grounded"]["change"]
        checks.append((f"grounded vs onpolicy_kd: >= 5% fewer pooled ({pct(c)})", c <= -0.05))
    if "text_judge" in arms:
        c = P["vs_distilled"]["grounded"]["errors_new"] < P["vs_distilled"]["text_judge"]["errors_new"]
        checks.append(("grounded vs text_judge: fewer errors pooled", c))
    if "unanchored" in arms:
        checks.append(("unanchored: more errors than grounded on every seed",
                       all(err[s, "unanchored"].sum() > err[s, "grounded"].sum() for s in seeds)))
    checks.append(("sweep: at every temperature grounded's WER no higher and distinct-2 no lower, pooled",
                   all(sw["grounded"][t]["wer_vs_teacher"] <= sw["distilled"][t]["wer_vs_teacher"]
                       and sw["grounded"][t]["distinct_2"] >= sw["distilled"][t]["distinct_2"] for t in sw["distilled"])))
    res["acceptance"] = {name: ok for name, ok in checks}
    print("\n## The issue's acceptance lines\n")
    for name, ok in checks:
        print(f"- [{'x' if ok else ' '}] {name}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
