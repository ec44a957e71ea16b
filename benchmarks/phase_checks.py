"""[Grounding proof] diagnostic: the held-out errors of the phase's student at *every* val check, not only the one
its selection keeps. Shows what any selection rule over those checks could reach (the best check per seed, read off
the held-out split, is an upper bound no honest rule attains) and where the errors move with the phase's steps.

    # 1. the phase again, every val check's student kept (RUN_DIR holds the seed's done ingest, pseudo_label and
    #    distill, or give --reuse a run that has them); the phase is deterministic, so it is the recipe's own
    .venv/bin/python benchmarks/phase_checks.py phase --config configs/demo.yaml --seed S --run-dir RUN_DIR [--reuse DIR]
    # 2. each kept check scored on the held-out split by the evaluate stage (greedy only), in OUT/step-NNNNNN
    .venv/bin/python benchmarks/phase_checks.py score --config configs/demo.yaml --seed S --run-dir RUN_DIR --out OUT
    # 3. the table: link OUT/step-NNNNNN as LINKS/seedS-stepN beside LINKS/seedS (the seed's recipe run), then
    .venv/bin/python benchmarks/ablation_summary.py --out LINKS --seeds 0 1 2 3 --arms step10 step20 ...

Step 1 runs the adversarial stage in this process with `select_by: confirmed_val_wer`'s pruning of candidates/
turned off (stages/models/selection.py keeps a check's student only until a later check has scored it); nothing
else changes, so the phase writes the weights and the selection it writes without this script (checked: the
kept step and the held-out errors of the kept check are the recipe run's). Step 2 copies the run's adversarial
directory per check with final/ holding that check's student (the manifest's file list rewritten to match) and
runs evaluate there at `evaluate.temperatures=[0.0]`; the upstream stages are linked, not copied. Each check's
copy is about 300 MB until its evaluate has run (the script then drops the copy's discriminators and best/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.graph import Runner  # noqa: E402
from pipeline.rundir import list_outputs  # noqa: E402


def run_phase(a) -> None:
    import stages.models.selection as selection

    selection.ConfirmedSelection.checkpointed = lambda self: None  # keep every check's student in candidates/
    cfg = load_config([str(a.config)], [f"seed={a.seed}", f"run.num_threads={a.threads}", *a.set])
    if cfg.root.adversarial.select_by != "confirmed_val_wer":
        raise SystemExit(f"phase_checks: the phase selects by {cfg.root.adversarial.select_by}; only "
                         "confirmed_val_wer keeps a student per check")
    Runner(cfg, a.run_dir, echo=print).run_graph(
        start=None if a.reuse else "adversarial", until="adversarial", reuse=str(a.reuse) if a.reuse else None,
        force=["adversarial"] if a.reuse else None)


def score(a) -> None:
    src = a.run_dir / "adversarial"
    checks = [c for c in sorted((src / "candidates").iterdir()) if c.name != "step-000000"]  # step 0 is distill's
    if not checks:
        raise SystemExit(f"phase_checks: no kept checks in {src / 'candidates'} (run `phase` first)")
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config([str(a.config)], [f"seed={a.seed}", f"run.num_threads={a.threads}",
                                        "evaluate.temperatures=[0.0]", *a.set])
    for c in checks:
        e = a.out / c.name
        if (e / "evaluate" / "report.json").is_file():
            continue
        shutil.rmtree(e, ignore_errors=True)
        e.mkdir()
        for stage in ("ingest", "pseudo_label", "distill"):
            (e / stage).symlink_to((a.run_dir / stage).resolve())
        adv = e / "adversarial"
        shutil.copytree(src, adv, ignore=shutil.ignore_patterns("checkpoints", "candidates", "tensorboard"))
        for name in ("lm", "projectors.safetensors", "student.json"):  # final/ becomes this check's student
            t = adv / "final" / name
            shutil.rmtree(t) if t.is_dir() else t.unlink()
            (shutil.copytree if (c / name).is_dir() else shutil.copy2)(c / name, t)
        manifest = json.loads((adv / "manifest.json").read_text())
        manifest["outputs"] = list_outputs(adv)
        (adv / "manifest.json").write_text(json.dumps(manifest, indent=1))
        Runner(cfg, e, echo=lambda s: None).run_graph(start="evaluate")
        shutil.rmtree(adv / "final" / "discriminators", ignore_errors=True)
        shutil.rmtree(adv / "best", ignore_errors=True)
        print(f"{c.name}: scored in {e / 'evaluate'}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("phase", "score"))
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--reuse", type=Path, help="phase: a run whose done stages up to distill this one reuses")
    ap.add_argument("--out", type=Path, help="score: where each check's copy and its evaluate go")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override")
    a = ap.parse_args()
    if a.what == "score" and a.out is None:
        ap.error("score needs --out")
    try:
        run_phase(a) if a.what == "phase" else score(a)
    except UserError as e:  # a run directory without the stages it needs, a bad override: one line
        print(f"phase_checks: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
