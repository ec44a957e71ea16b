"""The evaluation report: report.json, report.md and its PNG plots for one run, and the same across runs.

RUN/evaluate/report.json
    {set: {modality: {checkpoint: {metric: value}}}, "sweep": {set: {modality: {checkpoint: [point]}}}}
    metric values are numbers, [lo, hi] for `<metric>_ci`, or null when undefined; a sweep point is
    {temperature, quality_metric, quality, distinct_2, self_bleu_4, n_samples}.
RUN/evaluate/predictions.jsonl
    one line per scored sample: {set, modality, key, reference, teacher, outputs: {checkpoint: greedy text}}
RUN/evaluate/report.md
    tables first (per set and modality: rows = checkpoints, columns = metrics, CIs in brackets), then the
    plots, then ~8 sample outputs per set and modality beside the teacher label and the reference.
RUN/evaluate/training_curves.png, quality_diversity.png, disc_accuracy.png

Nothing here loads a model: the report is a function of files, so it can be redrawn and compared offline.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

SWEEP = "sweep"  # the top-level key of report.json that is not a set
TRAINING_STAGES = ("distill", "adversarial")  # stages whose metrics.jsonl the training curves show
CHECKPOINT_ORDER = ("teacher", "distill", "adversarial")
# Headline columns first, in this order; any other metric follows, sorted.
METRIC_ORDER = ("n_samples", "wer_vs_reference", "wer_change_vs_distill", "p_fewer_errors_than_distill",
                "wer_vs_teacher", "ier", "rep_5gram", "label_agreement", "category_agreement", "clip_score_teacher", "teacher_nll", "distinct_1", "distinct_2", "distinct_2_change_vs_distill", "self_bleu_4",
                "mean_length", "disc_accuracy", "disc_ranking")
LOWER_IS_BETTER = {"wer_vs_reference": True, "wer_change_vs_distill": True, "wer_vs_teacher": True,
                   "teacher_nll": True, "label_agreement": False, "category_agreement": False,
                   "distinct_2_change_vs_distill": False}
SAMPLES_PER_TABLE = 8
CELL_CHARS = 100  # longer sample texts are cut in the markdown table (predictions.jsonl keeps them whole)
_STEP_KEYS = ("step", "global_step", "iter")


# ------------------------------------------------------------------------------------------------ reading
def read_report(run: Path) -> dict | None:
    p = Path(run) / "evaluate" / "report.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sets_of(report: dict) -> dict:
    """The {set: {modality: {checkpoint: metrics}}} part of a report, the test split first."""
    return {k: report[k] for k in _order([k for k in report if k != SWEEP], ("test",))}


def read_curves(run: Path, stage: str) -> dict[str, list[tuple[float, float]]]:
    """Numeric series of RUN/<stage>/metrics.jsonl: key -> [(step, value)], in file order.

    The x of a record is its `step` (or `global_step`, `iter`), else its line number. Records may carry
    different keys (train lines and val lines); each key gets the records that hold it.
    """
    out: dict[str, list[tuple[float, float]]] = {}
    for i, rec in enumerate(read_jsonl(Path(run) / stage / "metrics.jsonl")):
        x = next((rec[k] for k in _STEP_KEYS if isinstance(rec.get(k), (int, float))), i)
        for k, v in rec.items():
            if k in _STEP_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            out.setdefault(k, []).append((float(x), float(v)))
    return out


def _is_loss(key: str) -> bool:
    return "loss" in key.lower() or key.lower() in ("ce", "kd", "kl", "nll", "val_nll", "ppl", "val_ppl")


def _loss_terms(keys) -> list[str]:
    """The loss curves worth a line: each term (cross-entropy, KD, KL, the policy-gradient and judges' losses,
    validation's), not their weighted total `loss`, whose terms come and go by batch (a batch without KD targets
    has no KD term) and would make it jump; the total only where a stage logs no term."""
    keys = [k for k in keys if _is_loss(k)]
    terms = [k for k in keys if k != "loss"]
    return terms or keys


def _is_disc_acc(key: str) -> bool:
    """disc_acc/<m> (thresholded accuracy) and disc_rank/<m> (real row above the input's samples)."""
    return key.startswith(("disc_acc", "disc_rank"))


# --------------------------------------------------------------------------------------------- formatting
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return _cell(str(v))


def _fmt_metric(metrics: dict, name: str) -> str:
    s = _fmt(metrics.get(name))
    ci = metrics.get(f"{name}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and metrics.get(name) is not None:
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def _cell(text: str | None, limit: int = CELL_CHARS) -> str:
    if text is None:
        return "–"
    t = " ".join(str(text).split())
    if len(t) > limit:
        t = t[: limit - 1] + "…"
    return t.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;") or "(empty)"


def _order(names: Iterable[str], first: tuple[str, ...]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def metric_columns(rows: Iterable[dict]) -> list[str]:
    """The metric names of a table (confidence intervals fold into their metric's column)."""
    names = [k for m in rows for k in m if not k.endswith("_ci")]
    return _order(names, METRIC_ORDER)


def _table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    """Markdown table lines; numeric: right-align every column but the first."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:" if numeric else "---"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def metrics_table(by_checkpoint: dict[str, dict]) -> list[str]:
    """Markdown lines: rows = checkpoints, columns = metrics, `value [lo, hi]` where a CI exists."""
    cps = _order(by_checkpoint, CHECKPOINT_ORDER)
    cols = metric_columns(by_checkpoint[c] for c in cps)
    return _table(["checkpoint", *cols], [[c, *(_fmt_metric(by_checkpoint[c], m) for m in cols)] for c in cps])


def compare_table(per_run: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown lines across runs: rows = checkpoints, columns = (metric, run) with the runs of one
    metric side by side. per_run: run name -> {checkpoint: metrics}."""
    cps = _order([c for cp in per_run.values() for c in cp], CHECKPOINT_ORDER)
    cols = metric_columns(m for cp in per_run.values() for m in cp.values())
    header = ["checkpoint"] + [f"{m}<br>{_cell(r, 40)}" for m in cols for r in per_run]
    rows = []
    for c in cps:
        rows.append([c] + [_fmt_metric(per_run[r].get(c, {}), m) if c in per_run[r] else "–"
                           for m in cols for r in per_run])
    return _table(header, rows)


def samples_table(preds: list[dict], limit: int = SAMPLES_PER_TABLE) -> list[str]:
    """Markdown lines: the first `limit` predictions with their greedy outputs beside the teacher label
    and the reference."""
    preds = preds[:limit]
    cps = _order([c for p in preds for c in p.get("outputs", {}) if c != "teacher"], CHECKPOINT_ORDER)
    header = ["key", "reference", "teacher", *cps]
    rows = [[_cell(p.get("key"), 40), _cell(p.get("reference")), _cell(p.get("teacher")),
             *(_cell(p.get("outputs", {}).get(c)) for c in cps)] for p in preds]
    return _table(header, rows, numeric=False)


# ------------------------------------------------------------------------------------------------ plotting
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """PNG through pipeline.files: a reader never sees a half-written plot."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_training_curves(runs: dict[str, Path], path: Path) -> bool:
    """One panel per stage in TRAINING_STAGES that logged a loss: one line per loss term of its metrics.jsonl
    (_loss_terms) against the step; runs overlaid by colour, terms by line style. False: nothing to plot."""
    plt = _pyplot()
    panels = []
    for stage in TRAINING_STAGES:
        curves = {name: read_curves(run, stage) for name, run in runs.items()}
        series = {name: {k: c[k] for k in _loss_terms(c)} for name, c in curves.items()}
        if any(series.values()):
            panels.append((stage, series))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (stage, series) in zip(axes[0], panels):
        keys = _order([k for s in series.values() for k in s], ("ce", "kd", "val_loss", "loss"))
        for ri, (name, s) in enumerate(series.items()):
            for ki, k in enumerate(keys):
                if k not in s:
                    continue
                xs, ys = zip(*s[k])
                multi_run = len(series) > 1
                label = f"{name}: {k}" if multi_run else k
                # runs by colour; keys by line style and marker (more keys than line styles stay apart)
                ax.plot(xs, ys, linestyle=_LINESTYLES[ki % len(_LINESTYLES)],
                        color=colors[(ri if multi_run else ki) % len(colors)],
                        marker=_MARKERS[ki % len(_MARKERS)] if len(xs) <= 30 else None, markersize=3, label=label)
        ax.set_title(f"{stage}: losses")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_disc_accuracy(runs: dict[str, Path], path: Path) -> bool:
    """Discriminator accuracy and ranking over adversarial training: every `disc_acc*` and `disc_rank*` key
    (one per modality, e.g. disc_acc/audio) of RUN/adversarial/metrics.jsonl against the step, with the 0.5
    chance line."""
    plt = _pyplot()
    series = {name: {k: v for k, v in read_curves(run, "adversarial").items() if _is_disc_acc(k)}
              for name, run in runs.items()}
    if not any(series.values()):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted({k for s in series.values() for k in s})
    multi_run = len(series) > 1
    for ri, (name, s) in enumerate(series.items()):
        for ki, k in enumerate(keys):
            if k not in s:
                continue
            xs, ys = zip(*s[k])
            ax.plot(xs, ys, color=colors[(ri if multi_run else ki) % len(colors)],
                    linestyle=_LINESTYLES[ki % len(_LINESTYLES)] if multi_run else "-",
                    marker="o" if len(xs) <= 30 else None, markersize=3,
                    label=f"{name}: {k}" if multi_run else k)
    ax.axhline(0.5, color="grey", linewidth=1, linestyle=":", label="chance")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("discriminators: accuracy and ranking (real labels vs student samples)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _sweep_panels(sweeps: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(set, modality, quality_metric) of every (set, modality) that has sweep points in any run."""
    seen: dict[tuple[str, str], str] = {}
    for sw in sweeps.values():
        for s, mods in sw.items():
            for m, cps in mods.items():
                for pts in cps.values():
                    for p in pts:
                        if p.get("quality") is not None:
                            seen.setdefault((s, m), p.get("quality_metric", "quality"))
    return [(s, m, q) for (s, m), q in sorted(seen.items())]


def plot_sweep(sweeps: dict[str, dict], path: Path, teacher_points: dict[str, dict] | None = None) -> bool:
    """Quality against diversity over the temperature sweep: for each (set, modality) one row of two
    panels, x = distinct-2 (left) and self-BLEU-4 (right, lower is more diverse), y = the quality metric;
    one line per checkpoint (and run), each point annotated with its temperature. sweeps: run name ->
    report["sweep"]. teacher_points: run name -> the report's sets; the diversity of the teacher's own
    labels is drawn as a dotted vertical line (the target a student's samples should reach). False:
    nothing to plot."""
    plt = _pyplot()
    panels = _sweep_panels(sweeps)
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.0 * len(panels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi_run = len(sweeps) > 1
    for row, (s, m, qname) in zip(axes, panels):
        lines = []
        for ri, (run, sw) in enumerate(sweeps.items()):
            cps = sw.get(s, {}).get(m, {})
            for cp in _order(cps, CHECKPOINT_ORDER):
                lines.append((run, ri, cp, [p for p in cps[cp] if p.get("quality") is not None]))
        cp_names = _order({cp for _, _, cp, _ in lines}, CHECKPOINT_ORDER)
        for ax, xkey, xlabel in ((row[0], "distinct_2", "distinct-2 (higher: more diverse)"),
                                 (row[1], "self_bleu_4", "self-BLEU-4 (lower: more diverse)")):
            for li, (run, ri, cp, pts) in enumerate(lines):
                pts = [p for p in pts if p.get(xkey) is not None]
                if not pts:
                    continue
                ci = cp_names.index(cp)
                color = colors[(ri if multi_run else ci) % len(colors)]
                xs = [p[xkey] for p in pts]
                ys = [p["quality"] for p in pts]
                ax.plot(xs, ys, color=color, marker=_MARKERS[ci % len(_MARKERS)],
                        linestyle=_LINESTYLES[ci % len(_LINESTYLES)] if multi_run else "-",
                        label=f"{run}: {cp}" if multi_run else cp)
                for p in pts:
                    ax.annotate(f"T={p['temperature']:g}", (p[xkey], p["quality"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=color)
            if teacher_points:
                for ri, (run, rep) in enumerate(teacher_points.items()):
                    t = rep.get(s, {}).get(m, {}).get("teacher", {})
                    if t.get(xkey) is not None:
                        ax.axvline(t[xkey], color=colors[ri % len(colors)] if multi_run else "grey",
                                   linestyle=":", linewidth=1, label=f"{run}: teacher labels" if multi_run else "teacher labels")
            ax.margins(0.1)  # room for the temperature labels at the ends
            ax.set_xlabel(xlabel)
            better = LOWER_IS_BETTER.get(qname)
            ax.set_ylabel(qname + ("" if better is None else (" (lower is better)" if better else " (higher is better)")))
            ax.set_title(f"{s} / {m}: quality vs diversity over temperature")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True


# ------------------------------------------------------------------------------------------------ one run
def render_markdown(title: str, report: dict, predictions: list[dict], plots: list[tuple[str, str]]) -> str:
    """report.md: the metric tables, then the plots (caption, file name), then sample outputs."""
    lines = [f"# {title}", ""]
    lines += ["Rates are fractions (0.25 = 25%); `[lo, hi]` is a 95% bootstrap interval over samples. Greedy decoding "
              "(temperature 0) for every checkpoint; `teacher` scores the teacher's own labels. WER, IER and 5-gram "
              "duplicates are on Whisper-normalised text; distinct-n, self-BLEU-4 and length on lower-cased words. "
              "`wer_change_vs_distill` is a checkpoint's relative change in errors against the distilled student on the "
              "same samples (-0.10: 10% fewer), its interval from a paired bootstrap, and `p_fewer_errors_than_distill` "
              "the fraction of resamples where it has fewer errors; `distinct_2_change_vs_distill` the change in "
              "distinct-2 against the distilled student's outputs (absolute; negative: less diverse), paired the same way.", ""]
    sets = sets_of(report)
    if not sets:
        lines += ["No set was evaluated.", ""]
    for s, mods in sets.items():
        for m, cps in mods.items():
            lines += [f"## {s} / {m}", "", *metrics_table(cps), ""]
    if plots:
        lines += ["## Plots", ""]
        for caption, fname in plots:
            lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in predictions:
        groups.setdefault((p.get("set"), p.get("modality")), []).append(p)
    if groups:
        lines += ["## Sample outputs (greedy)", ""]
        for (s, m), preds in groups.items():
            lines += [f"### {s} / {m}", "", *samples_table(preds), ""]
    return "\n".join(lines).rstrip() + "\n"


def draw_plots(runs: dict[str, Path], reports: dict[str, dict], out_dir: Path, prefix: str = "") -> list[tuple[str, str]]:
    """Write the PNGs that have data into out_dir; return [(caption, file name)]."""
    plots = []
    name = f"{prefix}training_curves.png"
    if plot_training_curves(runs, out_dir / name):
        plots.append(("Training curves", name))
    sweeps = {r: rep.get(SWEEP, {}) for r, rep in reports.items()}
    name = f"{prefix}quality_diversity.png"
    if plot_sweep(sweeps, out_dir / name, teacher_points={r: sets_of(rep) for r, rep in reports.items()}):
        plots.append(("Quality vs diversity (temperature sweep)", name))
    name = f"{prefix}disc_accuracy.png"
    if plot_disc_accuracy(runs, out_dir / name):
        plots.append(("Discriminator accuracy over adversarial training", name))
    return plots


def write_report(run: Path, out_dir: Path, report: dict, predictions: list[dict]) -> list[Path]:
    """Write report.json, predictions.jsonl, the plots and report.md into out_dir (RUN/evaluate);
    return the paths written."""
    out_dir = Path(out_dir)
    check_report(report)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "predictions.jsonl",
                      "".join(json.dumps(p, sort_keys=True, ensure_ascii=False) + "\n" for p in predictions))
    plots = draw_plots({Path(run).name: Path(run)}, {Path(run).name: report}, out_dir)
    atomic_write_text(out_dir / "report.md", render_markdown(f"Evaluation of run {Path(run).name}", report, predictions, plots))
    return [out_dir / "report.json", out_dir / "predictions.jsonl", out_dir / "report.md", *(out_dir / f for _, f in plots)]


def check_report(report: dict) -> None:
    """Raise ValueError unless report has the report.json schema (see the module docstring)."""
    for s, mods in sets_of(report).items():
        if not isinstance(mods, dict):
            raise ValueError(f"report[{s!r}] is not a mapping of modalities")
        for m, cps in mods.items():
            for cp, metrics in cps.items():
                for k, v in metrics.items():
                    ok = v is None or isinstance(v, (int, float)) or (
                        k.endswith("_ci") and isinstance(v, list) and len(v) == 2)
                    if not ok:
                        raise ValueError(f"report[{s!r}][{m!r}][{cp!r}][{k!r}] = {v!r} is not a number, null or [lo, hi]")
    for s, mods in report.get(SWEEP, {}).items():
        for m, cps in mods.items():
            for cp, pts in cps.items():
                for p in pts:
                    missing = {"temperature", "quality_metric", "quality", "distinct_2", "self_bleu_4"} - set(p)
                    if missing:
                        raise ValueError(f"sweep point of {s}/{m}/{cp} lacks {sorted(missing)}")


# ------------------------------------------------------------------------------------------------ compare
def _run_names(runs: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell the runs apart (two clones'
    `runs/demo` are `a/runs/demo` and `b/runs/demo`); the same folder named twice gets #1, #2."""
    paths = [Path(r).resolve() for r in runs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]).lstrip("/") for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{p.name}#{i + 1}" for i, p in enumerate(paths)]


def paired_changes(run_paths: dict[str, Path], n: int = 1000, seed: int = 0) -> list[str]:
    """Markdown lines: for each run after the first and each student checkpoint, the relative change of its WER
    against the first run's same checkpoint, on the clips both runs scored with the same reference (their
    evaluate/predictions.jsonl), with a paired bootstrap interval (text_metrics.paired_change). The way to read
    an ablation (anchored vs unanchored, MLE vs adversarial): both runs err on the same hard clips, so the
    paired interval is far tighter than the two runs' own intervals. No lines when no run has predictions."""
    from stages.evaluation import text_metrics as tm

    names = list(run_paths)
    preds = {}
    for name, path in run_paths.items():
        rows = read_jsonl(Path(path) / "evaluate" / "predictions.jsonl")
        preds[name] = {(r.get("set"), r.get("modality"), r.get("key")): r for r in rows
                       if tm.transcribes(r.get("modality")) and r.get("reference")}
    base = names[0]
    if len(names) < 2 or not preds[base]:
        return []
    lines = [f"## Paired WER change against `{base}`", "",
             f"Relative change in word errors against `{base}`'s same checkpoint, on the clips both runs scored "
             "(-0.10: 10% fewer errors); `[lo, hi]` is a 95% paired bootstrap interval, `P(fewer)` the fraction of "
             "resamples where the run has fewer errors.", ""]
    body = []
    for s, m in sorted({k[:2] for k in preds[base]}):
        for name in names[1:]:
            for cp in CHECKPOINT_ORDER[1:]:  # the students
                keys = sorted(k for k, r in preds[base].items() if k[:2] == (s, m) and k in preds[name]
                              and preds[name][k]["reference"] == r["reference"]
                              and cp in r.get("outputs", {}) and cp in preds[name][k].get("outputs", {}))
                if not keys:
                    continue
                a, b, ch = tm.paired_wer_change([preds[base][k]["outputs"][cp] for k in keys],
                                                [preds[name][k]["outputs"][cp] for k in keys],
                                                [preds[base][k]["reference"] for k in keys], n=n, seed=seed)
                if ch is None:
                    continue
                body.append([f"{s} / {m}", f"{name} {cp}", f"{a.wer:.3f}", f"{b.wer:.3f}",
                             f"{ch['change']:+.3f} [{ch['ci'][0]:+.3f}, {ch['ci'][1]:+.3f}]", f"{ch['p_lower']:.2f}",
                             str(len(keys))])
    if not body:
        return []
    return lines + _table(["set / modality", "run, checkpoint", f"WER {base}", "WER run", "change", "P(fewer)", "clips"],
                          body) + [""]


def compare_runs(runs: list[Path], out: Path | None = None) -> int:
    """`groundgan compare RUN_A RUN_B ...`: the report's tables across runs side by side (each metric's
    column split by run) and overlaid curves. Prints the markdown; with `out`, writes out/compare.md and
    its PNGs. Returns the exit code (0). Runs without evaluate/report.json still give their curves."""
    if not runs:
        raise UserError("compare: name at least one run directory")
    for r in runs:
        if not Path(r).is_dir():
            raise UserError(f"compare: run directory not found: {r}")
    names = _run_names(runs)
    run_paths = dict(zip(names, (Path(r) for r in runs)))
    reports = {n: read_report(p) for n, p in run_paths.items()}
    missing = [n for n, rep in reports.items() if rep is None]
    present = {n: rep for n, rep in reports.items() if rep is not None}

    lines = [f"# Comparison of {', '.join(names)}", ""]
    for n in names:
        lines.append(f"- `{n}`: {run_paths[n]}" + (" (no evaluate/report.json)" if n in missing else ""))
    lines.append("")
    set_mods: list[tuple[str, str]] = []
    for rep in present.values():
        for s, mods in sets_of(rep).items():
            for m in mods:
                if (s, m) not in set_mods:
                    set_mods.append((s, m))
    for s, m in set_mods:
        per_run = {n: rep.get(s, {}).get(m, {}) for n, rep in present.items()}
        lines += [f"## {s} / {m}", "", *compare_table(per_run), ""]
    lines += paired_changes(run_paths)
    plots: list[tuple[str, str]] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plots = draw_plots(run_paths, present, out, prefix="compare_")
        if plots:
            lines += ["## Plots", ""]
            for caption, fname in plots:
                lines += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    text = "\n".join(lines).rstrip() + "\n"
    if out is not None:
        atomic_write_text(out / "compare.md", text)
    print(text, end="")
    return 0
